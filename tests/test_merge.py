import math

import pytest
import torch

from ringlinear import RingLinearConfig, RingLinearForCausalLM
from ringlinear.checkpoint import CheckpointError, read_tensors
from ringlinear.train.merge import merge_checkpoints, merge_coefficients


@pytest.mark.parametrize("decay, f", [
    ("linear", lambda x: 1 - x),
    ("cosine", lambda x: 0.5 * (1 + math.cos(math.pi * x))),
    ("1-sqrt", lambda x: 1 - math.sqrt(x)),
])
def test_coefficients_reproduce_the_decay_weights(decay, f):
    c = merge_coefficients(5, decay)  # θ_0 … θ_4: k = 4 intervals
    assert sum(c) == pytest.approx(1.0)
    # w_i = Σ_{j ≥ i} c_j must equal f(i / (k + 1)) for i = 1 … k
    for i in range(1, 5):
        assert sum(c[i:]) == pytest.approx(f(i / 5))
    assert all(x >= -1e-12 for x in c)


def test_linear_decay_is_the_uniform_mean():
    assert merge_coefficients(4, "linear") == pytest.approx([0.25] * 4)
    assert merge_coefficients(1, "cosine") == [1.0]
    with pytest.raises(ValueError, match="decay"):
        merge_coefficients(3, "step")


def test_merged_checkpoint_equals_the_hand_computed_average(tmp_path):
    config = RingLinearConfig.preset("tiny", num_hidden_layers=3)
    dirs = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = RingLinearForCausalLM(config)
        for router in model.routers():
            router.expert_bias.normal_()
        model.save_pretrained(tmp_path / f"ckpt{seed}", max_shard_bytes=3_000_000)
        dirs.append(tmp_path / f"ckpt{seed}")
    c = merge_coefficients(3, "1-sqrt")
    merge_checkpoints(dirs, tmp_path / "merged", decay="1-sqrt")
    merged = dict(read_tensors(tmp_path / "merged"))
    inputs = [dict(read_tensors(d)) for d in dirs]
    for name in ("model.layers.1.mlp.experts.3.up_proj.weight", "model.layers.2.mlp.gate.expert_bias",
                 "lm_head.weight"):
        expected = sum(cj * ckpt[name].double() for cj, ckpt in zip(c, inputs))
        assert torch.allclose(merged[name].double(), expected, atol=1e-6)
    loaded = RingLinearForCausalLM.from_pretrained(tmp_path / "merged")
    assert loaded.routers()[0].expert_bias.dtype == torch.float32


def test_mismatched_checkpoints_are_refused(tmp_path):
    RingLinearForCausalLM(RingLinearConfig.preset("tiny", num_hidden_layers=3)).save_pretrained(tmp_path / "a")
    RingLinearForCausalLM(RingLinearConfig.preset("tiny", num_hidden_layers=4)).save_pretrained(tmp_path / "b")
    with pytest.raises(CheckpointError, match="same tensors"):
        merge_checkpoints([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
