"""Building blocks and routing against independent float64 references."""

import math

import pytest
import torch
import torch.nn.functional as F

from ringlinear import RingLinearConfig
from ringlinear.model.layers import RMSNorm, RotaryEmbedding, apply_rotary
from ringlinear.ops.policy import KernelPolicy
from ringlinear.model.moe import MoE
from ringlinear.ops.moe import combine_rows, dispatch_rows
from ringlinear.ops.attention import causal_attention
from ringlinear.ops.fused import powlu_gate

POLICY = KernelPolicy()  # the default kernels of the tensors' device


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_rms_norm_and_group_norm():
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    norm = RMSNorm(12, eps=1e-6).double()
    norm.weight.data.normal_()
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert rel(norm(x, POLICY), expected) < 1e-12
    group = RMSNorm(12, eps=1e-6, groups=3).double()
    group.weight.data.normal_()
    parts = [p / torch.sqrt((p**2).mean(-1, keepdim=True) + 1e-6) for p in x.split(4, dim=-1)]
    assert rel(group(x, POLICY), torch.cat(parts, -1) * group.weight) < 1e-12


def test_partial_neox_rope_rotates_pairs_by_position():
    D, rot, theta = 8, 4, 10000.0
    x = torch.randn(2, 6, 3, D, dtype=torch.float64)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [7, 9, 11, 13, 15, 17]])
    cos, sin = RotaryEmbedding(RingLinearConfig.preset("tiny", head_dim=D, rope_theta=theta))(positions)
    out = apply_rotary(x, cos, sin, policy=POLICY)
    # NeoX pairs channel i with i + rot/2 and turns the pair by angle pos * theta^(-2i/rot).
    expected = x.clone()
    for i in range(rot // 2):
        angle = positions.double()[..., None] * theta ** (-2 * i / rot)
        pair = torch.complex(x[..., i], x[..., i + rot // 2]) * torch.exp(1j * angle)
        expected[..., i], expected[..., i + rot // 2] = pair.real, pair.imag
    assert rel(out, expected) < 1e-6  # cos/sin are computed in fp32
    assert torch.equal(out[..., rot:], x[..., rot:])


def naive_attention(q, k, v, scale, allowed):
    """Loop over heads with an explicit mask `allowed[i, j]`; KV heads repeated for GQA."""
    H, KV = q.shape[2], k.shape[2]
    out = torch.zeros_like(q)
    for h in range(H):
        kh, vh = k[:, :, h // (H // KV)], v[:, :, h // (H // KV)]
        scores = scale * q[:, :, h] @ kh.transpose(-1, -2)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[:, :, h] = scores.softmax(-1) @ vh
    return out


def test_causal_attention_full_prefix_and_packed():
    q = torch.randn(2, 7, 4, 8, dtype=torch.float64)
    k, v = torch.randn(2, 7, 2, 8, dtype=torch.float64), torch.randn(2, 7, 2, 8, dtype=torch.float64)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    assert rel(causal_attention(q, k, v, 0.3), naive_attention(q, k, v, 0.3, causal)) < 1e-12
    # 3 new queries after 4 cached keys
    assert rel(causal_attention(q[:, 4:], k, v, 0.3), naive_attention(q, k, v, 0.3, causal)[:, 4:]) < 1e-12
    cu = torch.tensor([0, 3, 7])
    doc = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    allowed = causal & (doc[:, None] == doc[None, :])
    assert rel(causal_attention(q[:1], k[:1], v[:1], 0.3, cu_seqlens=cu),
               naive_attention(q[:1], k[:1], v[:1], 0.3, allowed)) < 1e-12


def route_one_token(x, config, gate_w, bias):
    """The published routing rule for one token, spelled out with Python sorting."""
    scores = [1 / (1 + math.exp(-float(s))) for s in gate_w @ x]
    choice = [s + float(b) for s, b in zip(scores, bias)]
    size = config.num_experts // config.n_group
    groups = [sum(sorted(choice[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(config.n_group)]
    kept = sorted(range(config.n_group), key=lambda g: -groups[g])[:config.topk_group]
    candidates = [e for e in range(config.num_experts) if e // size in kept]
    chosen = sorted(candidates, key=lambda e: -choice[e])[:config.num_experts_per_tok]
    total = sum(scores[e] for e in chosen)
    return {e: scores[e] / total * config.routed_scaling_factor for e in chosen}


def powlu_gate_by_formula(z):
    """PowLU's gate, arXiv 2605.25704 Eq. 1 with m = 3: z^(3/(√z+1))·σ(z) above 0, SiLU below."""
    return torch.where(z > 0, z.abs() ** (3 / (z.abs().sqrt() + 1)) * torch.sigmoid(z), F.silu(z))


GATES = {"silu": F.silu, "powlu": powlu_gate_by_formula}


@pytest.mark.parametrize("activation", ["silu", "powlu"])
def test_moe_matches_a_per_token_loop(activation):
    torch.manual_seed(0)
    config = RingLinearConfig.preset("tiny", hidden_size=32, moe_intermediate_size=16,
                                     moe_shared_expert_intermediate_size=16, hidden_act=activation)
    moe = MoE(config).double()
    for p in moe.parameters():
        p.data.normal_(std=0.3)
    moe.gate.expert_bias.normal_(std=0.5)  # large enough to change the choice
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    out = moe(x, POLICY)
    E = moe.experts
    expected = torch.zeros_like(out)
    for b in range(2):
        for t in range(9):
            xt = x[b, t]
            shared = moe.shared_experts
            expected[b, t] = shared.down_proj.weight @ (GATES[activation](shared.gate_proj.weight @ xt)
                                                        * (shared.up_proj.weight @ xt))
            for e, w in route_one_token(xt.detach(), config, moe.gate.weight.detach(), moe.gate.expert_bias).items():
                h = GATES[activation](E.gate_proj[e] @ xt) * (E.up_proj[e] @ xt)
                expected[b, t] = expected[b, t] + w * (E.down_proj[e] @ h)
    assert rel(out, expected) < 1e-10
    # the experts' gradients (the loop's routing weights are Python constants: x's gradient differs
    # by the router's path, which test_moe_dispatch_and_combine_rows_backward covers)
    dy = torch.randn_like(out)
    weights = [E.gate_proj, E.up_proj, E.down_proj]
    for got, want in zip(torch.autograd.grad(out, weights, dy), torch.autograd.grad(expected, weights, dy)):
        assert rel(got, want) < 1e-10


def test_moe_dispatch_and_combine_rows_backward():
    """The expert rows' gathers with gather-only backwards give indexing's own gradients."""
    torch.manual_seed(0)
    N, k, H = 7, 3, 5
    experts = torch.randint(0, 4, (N, k))
    order = experts.flatten().argsort(stable=True)
    back = torch.empty_like(order).scatter_(0, order, torch.arange(N * k))
    x = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(N * k, H, dtype=torch.float64)
    got = combine_rows(dispatch_rows(x, order, back, k) * scale, order, back)
    want = (x[order // k] * scale)[back]
    assert torch.equal(got, want)
    assert torch.equal(want, x.repeat_interleave(k, 0) * scale[back])  # row i·k + j: token i's j-th choice
    dy = torch.randn_like(got)
    assert rel(torch.autograd.grad(got, x, dy)[0], torch.autograd.grad(want, x, dy)[0]) < 1e-12


def powlu_by_paper(x: float, m: float = 3.0) -> float:
    """The paper's Eq. 1 (arXiv 2605.25704), scalar form: x·x^(m/(√x+1))·σ(x) for x > 0, x²·σ(x) below."""
    sigmoid = 1 / (1 + math.exp(-x))
    return x * x ** (m / (math.sqrt(x) + 1)) * sigmoid if x > 0 else x * x * sigmoid


POWLU_POINTS = [-40.0, -2.4, -1.0, -1e-3, 0.0, 1e-8, 1e-3, 0.3, 1.0, 4.0, 9.0, 100.0, 1e4, 1e8]


def test_powlu_gate_is_the_papers_formula():
    """Its §3.1 gated form x1·f(x2) with x1 = x2 = x is Eq. 1; at 1, 4 and 9 the exponent is 3/2, 1 and 3/4."""
    z = torch.tensor(POWLU_POINTS, dtype=torch.float64)
    expected = torch.tensor([powlu_by_paper(x) for x in POWLU_POINTS], dtype=torch.float64)
    assert torch.allclose(z * powlu_gate(z), expected, rtol=1e-12, atol=1e-300)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    hand = {1.0: sigmoid(1), 4.0: 4 * sigmoid(4), 9.0: 27 ** 0.5 * sigmoid(9), 0.0: 0.0, -1.0: -sigmoid(-1)}
    for x, gate in hand.items():
        assert abs(powlu_gate(torch.tensor(x, dtype=torch.float64)).item() - gate) < 1e-14


def test_powlu_gate_tends_to_one_and_keeps_finite_gradients():
    """x·gate(x) grows like x (gate → 1 from above), not SwiGLU's x²; gradients are finite everywhere,
    0 and the largest floats included, and match finite differences off the kink at 0."""
    for dtype in (torch.float32, torch.bfloat16):
        big = torch.tensor([1e2, 1e4, 1e8, 1e30, torch.finfo(dtype).max, -1e30, -torch.finfo(dtype).max], dtype=dtype,
                           requires_grad=True)
        gate = powlu_gate(big)
        assert gate.dtype == dtype and torch.isfinite(gate).all()
        assert (gate[:5] >= 1).all() and (gate[:5] < 3.6).all() and abs(gate[3].item() - 1) < 1e-2
        assert gate[:4].float().diff().le(0).all()  # decreasing towards 1
        gate.float().sum().backward()
        assert torch.isfinite(big.grad).all()
    z = torch.tensor(POWLU_POINTS, dtype=torch.float64, requires_grad=True)
    powlu_gate(z).sum().backward()
    assert torch.isfinite(z.grad).all()
    smooth = torch.tensor([-3.0, -0.5, 0.2, 1.0, 7.0, 300.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(powlu_gate, (smooth,))


def test_bias_changes_the_choice_not_the_weights():
    config = RingLinearConfig.preset("tiny", hidden_size=32)
    moe = MoE(config)
    for p in moe.parameters():
        p.data.normal_(std=0.3)
    x = torch.randn(50, 32)
    weights, experts = moe.gate(x)
    favourite = experts.flatten().mode().values
    moe.gate.expert_bias[favourite] -= 10.0  # push the most chosen expert out
    weights2, experts2 = moe.gate(x)
    assert (experts == favourite).any() and not (experts2 == favourite).any()
    scores = torch.sigmoid(x @ moe.gate.weight.T)
    expected = scores.gather(1, experts2)
    expected = expected / expected.sum(-1, keepdim=True) * config.routed_scaling_factor
    assert torch.allclose(weights2, expected, atol=1e-6)


def test_expert_bias_update_balances_load():
    config = RingLinearConfig.preset("tiny", hidden_size=32)
    moe = MoE(config).train()
    load = torch.arange(16, dtype=torch.float32)
    moe.gate.expert_load.copy_(load)
    moe.gate.update_bias(1e-3)
    sign = torch.sign(load.mean() - load)
    assert torch.allclose(moe.gate.expert_bias, 1e-3 * (sign - sign.mean()))
    assert moe.gate.expert_load.sum() == 0
    moe(torch.randn(4, 5, 32), POLICY)
    assert moe.gate.expert_load.sum() == 4 * 5 * config.num_experts_per_tok


def test_expert_bias_stays_fp32_under_dtype_casts():
    moe = MoE(RingLinearConfig.preset("tiny", hidden_size=32))
    moe.gate.expert_bias.fill_(1 + 2**-20)  # not representable in bf16
    moe = moe.to(torch.bfloat16)
    assert moe.gate.weight.dtype == torch.bfloat16
    assert moe.gate.expert_bias.dtype == torch.float32 and moe.gate.expert_bias[0].item() == 1 + 2**-20
