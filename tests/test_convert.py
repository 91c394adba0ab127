import json
import sysconfig
from pathlib import Path

import pytest
import torch

from ringlinear import RingLinearConfig, RingLinearForCausalLM
from ringlinear.convert import expand_gqa_to_mha, softmax_to_hybrid, source_config


def test_gqa_heads_are_repeated_for_the_query_heads_that_shared_them():
    H, KV, D, hidden = 4, 2, 3, 5
    qkv = torch.randn((H + 2 * KV) * D, hidden)
    mha = expand_gqa_to_mha(qkv, H, KV).unflatten(0, (3 * H, D))
    heads = qkv.unflatten(0, (H + 2 * KV, D))
    for h in range(H):
        assert torch.equal(mha[h], heads[h])  # q unchanged
        assert torch.equal(mha[H + h], heads[H + h // 2])  # k of group h // (H/KV)
        assert torch.equal(mha[2 * H + h], heads[H + KV + h // 2])  # v likewise


def test_ling_config_without_layer_group_size_is_all_softmax(tmp_path):
    values = RingLinearConfig.preset("tiny").to_dict()
    del values["layer_group_size"]
    (tmp_path / "config.json").write_text(json.dumps(values))
    config = source_config(tmp_path)
    assert all(config.is_softmax_layer(i) for i in range(config.num_hidden_layers))


def byte_batches(text: bytes, seq: int, batch: int, seed: int):
    data = torch.tensor(list(text), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(data) - seq, (batch,), generator=g)
        yield torch.stack([data[s:s + seq] for s in starts])


def loss_on(model, batches, n=4):
    with torch.no_grad():
        return sum(model(ids, labels=ids).loss.item() for ids, _ in zip(batches, range(n))) / n


@pytest.mark.slow
def test_converted_model_starts_far_below_a_random_one():
    text = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_bytes()
    train, held_out = text[: len(text) * 9 // 10], text[len(text) * 9 // 10:]
    config = RingLinearConfig.preset("tiny", vocab_size=256, hidden_size=96, intermediate_size=192,
                                     num_hidden_layers=4, moe_intermediate_size=48,
                                     moe_shared_expert_intermediate_size=48, layer_group_size=1)
    torch.manual_seed(0)
    softmax = RingLinearForCausalLM(config).train()
    optimizer = torch.optim.AdamW(softmax.parameters(), lr=3e-3)
    for ids, _ in zip(byte_batches(train, 64, 16, seed=0), range(120)):
        softmax(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    hybrid = softmax_to_hybrid(softmax.eval(), layer_group_size=2)
    assert hybrid.config.layer_types == ["linear", "softmax", "linear", "softmax"]
    random_hybrid = RingLinearForCausalLM(hybrid.config).eval()
    converted = loss_on(hybrid, byte_batches(held_out, 64, 8, seed=1))
    random = loss_on(random_hybrid, byte_batches(held_out, 64, 8, seed=1))
    trained = loss_on(softmax, byte_batches(held_out, 64, 8, seed=1))
    assert random > 5.0  # ≈ ln 256
    print(f"held-out loss: trained softmax {trained:.2f}, converted {converted:.2f}, random {random:.2f}")
    assert converted < random - 1.5, (converted, random, trained)


def test_source_must_be_all_softmax():
    with pytest.raises(ValueError, match="all-softmax"):
        softmax_to_hybrid(RingLinearForCausalLM(RingLinearConfig.preset("tiny")), layer_group_size=2)
