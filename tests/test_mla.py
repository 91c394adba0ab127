"""The Ring-2.5 / Ling-2.6 generation (Lightning + MLA, `BailingMoeV2_5ForCausalLM`).

`reference_forward` is a float64 reading of inclusionAI/Ring-V2.5 `models/modeling_bailing_moe_v2_5.py`
written on plain tensors under the published weight names, sharing no code with ringlinear: a random
checkpoint written in that layout must load through `from_pretrained` and give its logits.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from test_train import read_metrics, small_run

from ringlinear import RingLinearConfig, RingLinearForCausalLM
from ringlinear.generate import generate
from ringlinear.info import describe, model_info
from ringlinear.model.context import HybridCache, SequenceContext
from ringlinear.ops.attention import causal_attention
from ringlinear.ops.policy import KernelPolicy
from ringlinear.train import train
from ringlinear.train.metrics import FlopCounter

# A published-style config.json (field names of BailingMoeV2_5Config), small.
PUBLISHED = {
    "architectures": ["BailingMoeV2_5ForCausalLM"], "model_type": "bailing_hybrid", "vocab_size": 97,
    "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 4, "head_dim": 16, "partial_rotary_factor": 0.5, "rope_theta": 600000.0,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "num_experts": 8, "num_experts_per_tok": 2,
    "num_shared_experts": 1, "moe_intermediate_size": 24, "moe_shared_expert_intermediate_size": 24,
    "first_k_dense_replace": 1, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5,
    "layer_group_size": 2, "group_norm_size": 2, "kv_lora_rank": 24, "q_lora_rank": None,
    "qk_rope_head_dim": 8, "qk_nope_head_dim": 12, "v_head_dim": 10, "rope_interleave": True,
    "num_nextn_predict_layers": 0, "use_qkv_bias": False, "use_bias": False, "use_qk_norm": True,
    "tie_word_embeddings": False, "torch_dtype": "float32",
    # ours: the Ring-V2.5 file scales the decay by (layer - 1)
    "decay_layer_offset": 1,
}
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}


def is_mla(cfg: dict, i: int) -> bool:
    g, n = cfg["layer_group_size"], cfg["num_hidden_layers"]
    return i >= n or (i + 1) % g == 0 or i >= n // g * g


def published_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the published layout with its shape."""
    h, H, D, V = cfg["hidden_size"], cfg["num_attention_heads"], cfg["head_dim"], cfg["vocab_size"]
    qk, r, rope = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"], cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
    shapes = {"model.word_embeddings.weight": (V, h), "model.norm.weight": (h,), "lm_head.weight": (V, h)}
    for i in range(cfg["num_hidden_layers"] + cfg["num_nextn_predict_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
        if i >= cfg["num_hidden_layers"]:
            shapes |= {p + "enorm.weight": (h,), p + "hnorm.weight": (h,), p + "eh_proj.weight": (h, 2 * h),
                       p + "final_layernorm.weight": (h,)}
        a = p + "attention."
        if is_mla(cfg, i):
            if cfg["q_lora_rank"] is None:
                shapes[a + "q_proj.weight"] = (H * qk, h)
            else:
                q = cfg["q_lora_rank"]
                shapes |= {a + "q_a_proj.weight": (q, h), a + "q_a_layernorm.weight": (q,),
                           a + "q_b_proj.weight": (H * qk, q)}
            shapes |= {a + "kv_a_proj_with_mqa.weight": (r + rope, h), a + "kv_a_layernorm.weight": (r,),
                       a + "kv_b_proj.weight": (H * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]), r),
                       a + "dense.weight": (h, H * cfg["v_head_dim"])}
        else:
            shapes |= {a + "query_key_value.weight": (3 * H * D, h), a + "query_layernorm.weight": (D,),
                       a + "key_layernorm.weight": (D,), a + "g_proj.weight": (H * D, h),
                       a + "g_norm.weight": (H * D,), a + "dense.weight": (h, H * D)}
        m = p + "mlp."
        if i < cfg["first_k_dense_replace"]:
            widths = {m: cfg["intermediate_size"]}
        else:
            shapes |= {m + "gate.weight": (cfg["num_experts"], h), m + "gate.expert_bias": (cfg["num_experts"],)}
            widths = {f"{m}experts.{e}.": cfg["moe_intermediate_size"] for e in range(cfg["num_experts"])}
            widths[m + "shared_experts."] = cfg["moe_shared_expert_intermediate_size"] * cfg["num_shared_experts"]
        for prefix, w in widths.items():
            shapes |= {prefix + "gate_proj.weight": (w, h), prefix + "up_proj.weight": (w, h),
                       prefix + "down_proj.weight": (h, w)}
    return shapes


def random_checkpoint(cfg: dict, directory, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in published_shapes(cfg).items():
        if name.endswith(("norm.weight", "layernorm.weight")):
            state[name] = 1 + 0.2 * torch.randn(shape, generator=g)
        elif name.endswith("expert_bias"):
            state[name] = 0.05 * torch.randn(shape, generator=g)
        else:
            state[name] = torch.randn(shape, generator=g) / math.sqrt(shape[-1])
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(cfg))
    return {k: v.double() for k, v in state.items()}


# -- the float64 reference -------------------------------------------------------------------------

def rms(x, w, eps=1e-6):
    return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def rope_tables(cfg: dict, T: int):
    """transformers' default / YaRN rope init over dim = head_dim * partial_rotary_factor."""
    dim, base = int(cfg["head_dim"] * cfg["partial_rotary_factor"]), cfg["rope_theta"]
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    scaling, attention_factor = cfg.get("rope_scaling"), 1.0
    if scaling:
        factor = scaling["factor"]

        def mscale(s, m=1.0):
            return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0
        attention_factor = mscale(factor, scaling["mscale"]) / mscale(factor, scaling["mscale_all_dim"])

        def corr(rot):
            return dim * math.log(scaling["original_max_position_embeddings"] / (rot * 2 * math.pi)) / (
                2 * math.log(base))
        low = max(math.floor(corr(scaling["beta_fast"])), 0)
        high = min(math.ceil(corr(scaling["beta_slow"])), dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        inv = inv / factor * ramp + inv * (1 - ramp)
    freqs = torch.arange(T, dtype=torch.float64)[:, None] * inv
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * attention_factor, emb.sin() * attention_factor


def slopes(n):
    if math.log2(n).is_integer():
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]
    c = 2 ** math.floor(math.log2(n))
    return slopes(c) + slopes(2 * c)[0::2][: n - c]


def linear_attention(s, p, cfg, i, x, cos, sin):
    B, T, _ = x.shape
    H, D = cfg["num_attention_heads"], cfg["head_dim"]
    q, k, v = (x @ s[p + "query_key_value.weight"].T).view(B, T, 3 * H, D).split([H, H, H], dim=2)
    q, k = rms(q, s[p + "query_layernorm.weight"]), rms(k, s[p + "key_layernorm.weight"])
    rot = cos.shape[-1]
    c, sn = cos[None, :, None], sin[None, :, None]
    q = torch.cat([q[..., :rot] * c + rotate_half(q[..., :rot]) * sn, q[..., rot:]], -1)
    k = torch.cat([k[..., :rot] * c + rotate_half(k[..., :rot]) * sn, k[..., rot:]], -1)
    g = -torch.tensor(slopes(H), dtype=torch.float64) * (1 - (i - 1) / (cfg["num_hidden_layers"] - 1) + 1e-5)
    state = torch.zeros(B, H, D, D, dtype=torch.float64)
    outs = []
    for t in range(T):  # fla's simple GLA, recurrent: S = e^g S + kᵀv, o = D^-½ q S
        state = g.exp()[None, :, None, None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, t] * D**-0.5, state))
    o = torch.stack(outs, 1).reshape(B, T, H * D)
    groups = o.view(B, T, cfg["group_norm_size"], -1)
    o = groups / torch.sqrt(groups.pow(2).mean(-1, keepdim=True) + cfg["rms_norm_eps"])
    o = s[p + "g_norm.weight"] * o.view(B, T, -1) * torch.sigmoid(x @ s[p + "g_proj.weight"].T)
    return o @ s[p + "dense.weight"].T


def mla(s, p, cfg, x, cos, sin):
    B, T, _ = x.shape
    H, nope, rope, vd = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    if cfg["q_lora_rank"] is None:
        q = x @ s[p + "q_proj.weight"].T
    else:
        q = rms(x @ s[p + "q_a_proj.weight"].T, s[p + "q_a_layernorm.weight"]) @ s[p + "q_b_proj.weight"].T
    q = q.view(B, T, H, nope + rope).transpose(1, 2)
    q_pass, q_rot = q.split([nope, rope], -1)
    k_pass, k_rot = (x @ s[p + "kv_a_proj_with_mqa.weight"].T).split([cfg["kv_lora_rank"], rope], -1)
    kv = (rms(k_pass, s[p + "kv_a_layernorm.weight"]) @ s[p + "kv_b_proj.weight"].T).view(B, T, H, nope + vd)
    k_pass, v = kv.transpose(1, 2).split([nope, vd], -1)
    k_rot = k_rot.view(B, 1, T, rope)

    def interleaved(y):  # apply_rotary_pos_emb_interleave
        y = y.view(*y.shape[:-1], rope // 2, 2).transpose(-1, -2).reshape(y.shape)
        return y * cos + rotate_half(y) * sin
    q = torch.cat([q_pass, interleaved(q_rot)], -1)
    k = torch.cat([k_pass, interleaved(k_rot).expand(B, H, T, rope)], -1)
    scale = (nope + rope) ** -0.5
    if cfg.get("rope_scaling"):
        m = 0.1 * cfg["rope_scaling"]["mscale_all_dim"] * math.log(cfg["rope_scaling"]["factor"]) + 1.0
        scale *= m * m
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * vd)
    return o @ s[p + "dense.weight"].T


def mlp(s, p, x):
    return (F.silu(x @ s[p + "gate_proj.weight"].T) * (x @ s[p + "up_proj.weight"].T)) @ s[p + "down_proj.weight"].T


def moe(s, p, cfg, x):
    flat = x.reshape(-1, x.shape[-1])
    scores = torch.sigmoid(flat @ s[p + "gate.weight"].T)
    routing = scores + s[p + "gate.expert_bias"]
    n, G = flat.shape[0], cfg["n_group"]
    group_scores = routing.view(n, G, -1).topk(2, dim=-1)[0].sum(-1)
    keep = torch.zeros(n, G).scatter_(1, group_scores.topk(cfg["topk_group"], dim=-1)[1], 1)
    masked = routing.masked_fill(~keep.repeat_interleave(cfg["num_experts"] // G, 1).bool(), float("-inf"))
    idx = masked.topk(cfg["num_experts_per_tok"], dim=-1)[1]
    w = scores.gather(1, idx)
    w = w / (w.sum(-1, keepdim=True) + 1e-20) * cfg["routed_scaling_factor"]
    y = torch.zeros_like(flat)
    for t in range(n):
        for j in range(idx.shape[1]):
            y[t] += w[t, j] * mlp(s, f"{p}experts.{int(idx[t, j])}.", flat[t])
    return y.view_as(x) + mlp(s, p + "shared_experts.", x)


def block(s, cfg, i, h, cos, sin):
    p = f"model.layers.{i}."
    a = rms(h, s[p + "input_layernorm.weight"], cfg["rms_norm_eps"])
    if is_mla(cfg, i):
        h = h + mla(s, p + "attention.", cfg, a, cos, sin)
    else:
        h = h + linear_attention(s, p + "attention.", cfg, i, a, cos, sin)
    m = rms(h, s[p + "post_attention_layernorm.weight"], cfg["rms_norm_eps"])
    return h + (mlp(s, p + "mlp.", m) if i < cfg["first_k_dense_replace"] else moe(s, p + "mlp.", cfg, m))


def reference_forward(s: dict, cfg: dict, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits [B, T, V], mean cross-entropy of the first MTP layer against ids[t + 2] or None)."""
    T, L, eps = ids.shape[1], cfg["num_hidden_layers"], cfg["rms_norm_eps"]
    cos, sin = rope_tables(cfg, T)
    h = s["model.word_embeddings.weight"][ids]
    for i in range(L):
        h = block(s, cfg, i, h, cos, sin)
    h = rms(h, s["model.norm.weight"], eps)
    logits = h @ s["lm_head.weight"].T
    if not cfg["num_nextn_predict_layers"]:
        return logits, None
    p = f"model.layers.{L}."
    rolled = torch.roll(ids, -1, dims=1)
    rolled[:, -1] = 0
    e = rms(s["model.word_embeddings.weight"][rolled], s[p + "enorm.weight"], eps)
    x = torch.cat([e, rms(h, s[p + "hnorm.weight"], eps)], -1) @ s[p + "eh_proj.weight"].T
    x = rms(block(s, cfg, L, x, cos, sin), s[p + "final_layernorm.weight"], eps)
    mtp_logits = (x @ s["lm_head.weight"].T)[:, : T - 2]
    return logits, F.cross_entropy(mtp_logits.flatten(0, 1), ids[:, 2:].flatten())


# -- the tests ----------------------------------------------------------------------------------

def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("changes", [{}, {"q_lora_rank": 20, "rope_scaling": YARN, "num_nextn_predict_layers": 1}],
                         ids=["q_proj", "q_lora+yarn+mtp"])
def test_published_layout_loads_and_equals_the_float64_reference(tmp_path, changes):
    cfg = {**PUBLISHED, **changes}
    state = random_checkpoint(cfg, tmp_path)
    model = RingLinearForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    assert model.config.attention_type == "mla"
    ids = torch.randint(0, cfg["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    out = model(ids, labels=ids)
    logits, mtp_loss = reference_forward(state, cfg, ids)
    assert rel(out.logits, logits) < 1e-4
    if mtp_loss is not None:
        assert abs(out.mtp_loss.item() - mtp_loss.item()) < 1e-4 * mtp_loss.item()
    model.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert {k: saved[k] for k in cfg if k != "torch_dtype"} == {k: v for k, v in cfg.items() if k != "torch_dtype"}
    with safe_open(str(tmp_path / "again" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(state)


def test_mla_file_must_give_its_shapes_and_agree_with_its_architecture(tmp_path):
    cfg = {k: v for k, v in PUBLISHED.items() if k != "v_head_dim"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="lacks v_head_dim"):
        RingLinearConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="kv_lora_rank=None: BailingMoeV2_5ForCausalLM has MLA"):
        RingLinearConfig.preset("tiny", architectures=["BailingMoeV2_5ForCausalLM"])
    with pytest.raises(ValueError, match="qk_rope_head_dim=16: must equal head_dim"):
        RingLinearConfig.preset("tiny-mla", qk_rope_head_dim=16)


def tiny_mla(**changes):
    torch.manual_seed(0)
    config = RingLinearConfig.preset("tiny-mla", vocab_size=512, hidden_size=128, intermediate_size=256, **changes)
    return RingLinearForCausalLM(config).eval()


@torch.no_grad()
def test_latent_cache_prefill_then_decode_equals_the_full_forward():
    model = tiny_mla()
    ids = torch.randint(0, 512, (2, 12))
    full = model(ids).logits
    cache = HybridCache(model.config, 2, 16)
    steps = [model(ids[:, :7], context=cache).logits] + [model(ids[:, t:t + 1], context=cache).logits
                                                        for t in range(7, 12)]
    assert rel(torch.cat(steps, 1), full) < 1e-5
    # per MLA layer and token: the latent and the rope key only
    assert cache.keys[2].shape == (2, 16, 64) and cache.values[2].shape == (2, 16, 32)
    assert len(generate(model, [ids[0, :5].tolist()], max_new_tokens=3, seed=0)[0]) == 3


def test_packed_documents_equal_separate_runs_and_gradients_reach_every_parameter():
    model = tiny_mla().train()
    a, b = torch.randint(0, 512, (1, 9)), torch.randint(0, 512, (1, 6))
    packed = model(torch.cat([a, b], 1), context=SequenceContext(torch.tensor([0, 9, 15]))).logits
    assert rel(packed, torch.cat([model(a).logits, model(b).logits], 1)) < 1e-5
    ids = torch.randint(0, 512, (2, 10))
    model(ids, labels=ids).loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()] == []


def test_narrow_values_through_every_attention_kernel():
    q, k = torch.randn(1, 10, 4, 12, dtype=torch.float64), torch.randn(1, 10, 4, 12, dtype=torch.float64)
    v = torch.randn(1, 10, 4, 7, dtype=torch.float64)
    cu = torch.tensor([0, 4, 10])
    sdpa = causal_attention(q, k, v, 0.3, cu_seqlens=cu)
    blocks = causal_attention(q, k, v, 0.3, cu_seqlens=cu, policy=KernelPolicy(invariant=True))
    assert sdpa.shape == (1, 10, 4, 7) and rel(blocks, sdpa) < 1e-12


def test_cache_bytes_and_flops_of_mla():
    config = RingLinearConfig.preset("ring-2.5-1t")
    info = model_info(config)
    assert info.kv_bytes_per_token == 10 * (512 + 64) * 2  # ten MLA layers, bf16 latent + rope key
    assert 0.99e12 < info.total_params < 1.02e12 and 62.5e9 < info.active_params < 64e9  # Ling-2.5-1T: 1T, 63B
    # Ling-2.6-flash's model card: ~104B total, ~7.4B active, not counting the MTP layer
    flash = RingLinearConfig.preset("ling-2.6-flash")
    assert [i for i, kind in enumerate(flash.layer_types) if kind == "softmax"] == [7, 15, 23, 31]
    without_mtp = model_info(flash.replace(num_nextn_predict_layers=0))
    assert 103.5e9 < without_mtp.total_params < 104.5e9 and 7.35e9 < without_mtp.active_params < 7.5e9
    assert 107e9 < model_info(flash).total_params < 108e9  # Hugging Face's 107B: the MTP layer's too
    assert "104.2G total, 7.4G active without the MTP layers" in describe(flash)
    tiny = RingLinearConfig.preset("tiny-mla")
    flops = FlopCounter(tiny)
    # 3 MLA layers (2 + the MTP layer): QKᵀ over 64 channels and PV over 48 per head, 4 heads
    assert flops.per_pair == 3 * (64 + 48) * 4


def test_mla_with_mtp_trains_and_exports_the_published_layout(tmp_path):
    """The trainer on `tiny-mla` (MLA layers, one MTP layer on MLA): the MTP loss is logged and falls,
    and the exported checkpoint holds the MTP layer under the published names."""
    small = dict(vocab_size=512, hidden_size=64, num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=32,
                 moe_shared_expert_intermediate_size=32)
    result = train(small_run(tmp_path, preset="tiny-mla", model_overrides=small))
    steps = [m for m in read_metrics(tmp_path) if "mtp_loss" in m]
    assert len(steps) == 8 and steps[-1]["mtp_loss"] < steps[0]["mtp_loss"] - 0.1
    config = json.loads((result.checkpoint_dir / "config.json").read_text())
    assert config["architectures"] == ["BailingMoeV2_5ForCausalLM"] and config["num_nextn_predict_layers"] == 1
    with safe_open(str(result.checkpoint_dir / "model.safetensors"), "pt") as f:
        mtp = {k.removeprefix("model.layers.3.") for k in f.keys() if k.startswith("model.layers.3.")}
    assert {"eh_proj.weight", "enorm.weight", "hnorm.weight", "final_layernorm.weight", "attention.q_a_proj.weight",
            "attention.kv_a_proj_with_mqa.weight", "attention.kv_b_proj.weight", "attention.dense.weight"} <= mtp
    assert result.model.config.attention_type == "mla" and len(result.model.model.mtp_layers) == 1
