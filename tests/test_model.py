"""The whole model: the inference path equals the training path, packing, MTP, checkpoint names."""

import re

import pytest
import torch

from ringlinear import HybridCache, RingLinearConfig, RingLinearForCausalLM, SequenceContext
from ringlinear.model.weights import checkpoint_tensors
from ringlinear.ops.policy import KernelPolicy


def tiny(**overrides):
    torch.manual_seed(0)
    return RingLinearForCausalLM(RingLinearConfig.preset("tiny", **overrides)).eval()


def max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("offset", [0, 1])
def test_prefill_then_decode_equals_the_full_forward(offset):
    model = tiny(decay_layer_offset=offset)
    ids = torch.randint(0, model.config.vocab_size, (3, 40))
    with torch.no_grad():
        full = model(ids).logits
        cache = HybridCache(model.config, 3, 64)
        pieces = [model(ids[:, :17], context=cache).logits, model(ids[:, 17:23], context=cache).logits]
        pieces += [model(ids[:, t:t + 1], context=cache).logits for t in range(23, 40)]
    assert max_rel(torch.cat(pieces, 1), full) <= 1e-5
    assert cache.length == 40


def test_cache_holds_fixed_state_for_linear_layers_and_kv_for_softmax_layers():
    model = tiny()
    c = model.config
    cache = HybridCache(c, 2, 100)
    linear = [i for i, kind in enumerate(c.layer_types) if kind == "linear"]
    assert sorted(cache.states) == linear and sorted(cache.keys) == [2, 5]
    assert cache.states[0].shape == (2, c.num_attention_heads, c.head_dim, c.head_dim)
    assert cache.states[0].dtype == torch.float32
    assert cache.keys[2].shape == (2, 100, c.num_key_value_heads, c.head_dim)
    with pytest.raises(ValueError, match="cache is full"):
        model(torch.zeros(2, 101, dtype=torch.long), context=cache)


def test_packed_documents_equal_separate_runs():
    model = tiny(num_nextn_predict_layers=1)
    lengths = [7, 1, 12]
    docs = [torch.randint(0, model.config.vocab_size, (1, n)) for n in lengths]
    cu = torch.tensor([0, 7, 8, 20])
    with torch.no_grad():
        packed = model(torch.cat(docs, 1), context=SequenceContext(cu)).logits
        alone = torch.cat([model(d).logits for d in docs], 1)
    assert max_rel(packed, alone) <= 1e-5


def test_loss_is_shifted_cross_entropy_and_ignores_document_boundaries():
    model = tiny()
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    out = model(ids, labels=ids, context=SequenceContext(torch.tensor([0, 5, 12])))
    logp = out.logits.log_softmax(-1)[0]
    targets = [(t, ids[0, t + 1]) for t in range(11) if t != 4]  # position 4 ends document 0
    expected = -torch.stack([logp[t, y] for t, y in targets]).mean()
    assert torch.allclose(out.lm_loss, expected, atol=1e-6)
    assert out.mtp_loss is None and out.loss is out.lm_loss


def test_mtp_predicts_two_ahead_causally():
    model = tiny(num_nextn_predict_layers=2)
    assert [type(layer).__name__ for layer in model.model.layers[6:]] == ["MTPLayer", "MTPLayer"]
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    out = model(ids, labels=ids)
    assert out.mtp_loss is not None
    assert torch.allclose(out.loss, out.lm_loss + model.config.mtp_loss_scaling_factor * out.mtp_loss)
    # Depth d at position t sees tokens up to t + d and predicts t + d + 1: changing token 10
    # leaves the depth-1 prediction made at positions < 9 and depth-2 at positions < 8 unchanged.
    changed = ids.clone()
    changed[0, 10] = (ids[0, 10] + 1) % model.config.vocab_size
    losses = []
    for x in (ids, changed):
        per_depth = []
        h = model(x).hidden_states
        shifted = x
        for layer in model.model.mtp_layers:
            shifted = torch.roll(shifted, -1, dims=1)
            h = layer(model.model.word_embeddings(shifted), h, model.model.rotary(torch.arange(16)[None]),
                      SequenceContext())
            per_depth.append(model.lm_head(layer.final_layernorm(h, KernelPolicy())))
        losses.append(per_depth)
    # (equal up to rounding: the rows each expert multiplies differ between the two runs)
    assert torch.allclose(losses[0][0][:, :9], losses[1][0][:, :9], atol=1e-5)
    assert not torch.allclose(losses[0][0][:, 9], losses[1][0][:, 9], atol=1e-3)
    assert torch.allclose(losses[0][1][:, :8], losses[1][1][:, :8], atol=1e-5)


def test_gradients_reach_every_parameter():
    model = tiny(num_nextn_predict_layers=1).train()
    ids = torch.randint(0, model.config.vocab_size, (4, 64))
    model(ids, labels=ids).loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def published_mini_shapes():
    """Every tensor of Ring-mini-linear-2.0 with its shape, as listed from the released checkpoint."""
    shapes = {"model.word_embeddings.weight": (157184, 2048), "model.norm.weight": (2048,),
              "lm_head.weight": (157184, 2048)}
    for i in range(20):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (2048,)
        shapes[p + "post_attention_layernorm.weight"] = (2048,)
        shapes[p + "attention.query_layernorm.weight"] = (128,)
        shapes[p + "attention.key_layernorm.weight"] = (128,)
        shapes[p + "attention.dense.weight"] = (2048, 2048)
        if i in (4, 9, 14, 19):
            shapes[p + "attention.query_key_value.weight"] = (3072, 2048)
        else:
            shapes[p + "attention.query_key_value.weight"] = (6144, 2048)
            shapes[p + "attention.g_proj.weight"] = (2048, 2048)
            shapes[p + "attention.g_norm.weight"] = (2048,)
        if i == 0:
            shapes.update({p + "mlp.gate_proj.weight": (5120, 2048), p + "mlp.up_proj.weight": (5120, 2048),
                           p + "mlp.down_proj.weight": (2048, 5120)})
            continue
        shapes[p + "mlp.gate.weight"] = (256, 2048)
        shapes[p + "mlp.gate.expert_bias"] = (256,)
        for e in [f"experts.{e}" for e in range(256)] + ["shared_experts"]:
            shapes[f"{p}mlp.{e}.gate_proj.weight"] = (512, 2048)
            shapes[f"{p}mlp.{e}.up_proj.weight"] = (512, 2048)
            shapes[f"{p}mlp.{e}.down_proj.weight"] = (2048, 512)
    return shapes


def test_mini_weight_names_and_shapes_match_the_published_checkpoint():
    with torch.device("meta"):
        model = RingLinearForCausalLM(RingLinearConfig.preset("mini"))
    ours = {name: tuple(t.shape) for name, t in checkpoint_tensors(model)}
    assert ours == published_mini_shapes()
    assert dict(checkpoint_tensors(model))["model.layers.3.mlp.gate.expert_bias"].dtype == torch.float32
    total = sum(t.numel() for _, t in checkpoint_tensors(model))
    assert 16.3e9 < total < 16.5e9


def test_flash_has_mtp_layer_after_the_main_stack():
    with torch.device("meta"):
        model = RingLinearForCausalLM(RingLinearConfig.preset("flash"))
    names = {name for name, _ in checkpoint_tensors(model)}
    for part in ("enorm", "hnorm", "eh_proj", "final_layernorm", "attention.query_key_value", "mlp.gate"):
        assert any(re.fullmatch(rf"model\.layers\.32\.{re.escape(part)}\.weight", n) for n in names), part
    assert not any(n.startswith("model.layers.33.") for n in names)


def test_forward_rejects_bad_input():
    model = tiny()
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="not both"):
        model(torch.zeros(1, 4, dtype=torch.long), logits_to_keep=1, logits_indices=torch.tensor([0]))
