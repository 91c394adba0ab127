"""The fused routed experts (`ops.moe_kernels`, through the interpreter on a CPU): the tile schedule, the
forward and every gradient against a float64 per-token loop, the MoE layer against the expert loop,
and the rule that picks the fused path."""

import pytest
import torch

from ringlinear import RingLinearConfig
from ringlinear.model.moe import MoE
from ringlinear.ops.fused import GATES
from ringlinear.ops.policy import KernelPolicy, experts_kernel, triton_installed

pytestmark = pytest.mark.skipif(not triton_installed(), reason="the fused kernels need Triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = KernelPolicy("triton")


def test_the_schedule_covers_every_row_once():
    from ringlinear.ops.moe_kernels import BLOCK_M, row_tiles, schedule_tiles
    for sizes in ([0, 130, 0, 1, 64, 0, 7, 200], [0] * 5 + [3], [BLOCK_M] * 3, [1] * 70):
        counts = torch.tensor(sizes, device=DEVICE)
        M, E = sum(sizes), len(sizes)
        expert, start, end = schedule_tiles(counts, M).tolist()
        assert len(expert) == row_tiles(M, E)
        ends = counts.cumsum(0).tolist()
        covered = []
        for e, s, t in zip(expert, start, end):
            if e == E:  # past the last tile
                continue
            assert ends[e] - sizes[e] <= s < t <= ends[e] and t - s <= BLOCK_M
            covered += range(s, t)
        assert covered == list(range(M))
        real = [e for e in expert if e < E]
        assert real == sorted(real) and expert == real + [E] * (len(expert) - len(real))  # spare tiles last


def problem(dtype: torch.dtype, N: int = 70, E: int = 12, k: int = 3, hidden: int = 96, inter: int = 48):
    """Weights, routing weights and choices that leave experts 2, 5 and 11 empty and give expert 7 every
    token (two row tiles); hidden and inter are not multiples of the tiles, nor N·k of BLOCK_M."""
    g = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(E, inter, hidden, generator=g) * hidden ** -0.5 for _ in range(2))
    down = torch.randn(E, hidden, inter, generator=g) * inter ** -0.5
    x = torch.randn(N, hidden, generator=g)
    allowed = torch.tensor([e for e in range(E) if e not in (2, 5, 7, 11)])
    others = allowed[torch.rand(N, len(allowed), generator=g).argsort(1)[:, :k - 1]]
    experts = torch.cat([others[:, :1], torch.full((N, 1), 7), others[:, 1:]], 1)  # 7 as the second choice
    weights = torch.rand(N, k, generator=g) + 0.5
    tensors = [t.to(DEVICE, dtype) for t in (x, gate, up, down)] + [weights.to(DEVICE)]
    return [t.requires_grad_() for t in tensors], experts.to(DEVICE)


def reference(x, gate, up, down, weights, experts, activation):
    """Σ_k w · down(act(gate x) · up x), one token and choice at a time, in float64."""
    x, gate, up, down, weights = (t.double() for t in (x, gate, up, down, weights))
    rows = []
    for t in range(x.shape[0]):
        row = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        for c, e in enumerate(experts[t].tolist()):
            row = row + weights[t, c] * (down[e] @ (GATES[activation](gate[e] @ x[t]) * (up[e] @ x[t])))
        rows.append(row)
    return torch.stack(rows)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("activation", ["silu", "powlu"])
def test_forward_and_gradients_match_a_float64_loop(dtype, tol, activation):
    from ringlinear.ops.moe_kernels import fused_experts
    inputs, experts = problem(dtype)
    out = fused_experts(*inputs, experts, activation)
    want = reference(*inputs, experts, activation)
    assert out.dtype == dtype and out.shape == want.shape
    assert rel(out, want) < tol
    with torch.no_grad():  # the forward without saved products gives the same bits
        assert torch.equal(fused_experts(*inputs, experts, activation), out)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    got = torch.autograd.grad(out, inputs, dy)
    wanted = torch.autograd.grad(want, inputs, dy.double())
    for name, a, b in zip(("x", "gate", "up", "down", "weights"), got, wanted):
        assert a.dtype == b.dtype or a.dtype == dtype, name
        assert rel(a, b) < 2 * tol, name
    for e in (2, 5, 11):  # an empty expert's weights get no gradient
        assert not got[1][e].any() and not got[2][e].any() and not got[3][e].any()


def test_no_tokens_is_no_work():
    from ringlinear.ops.moe_kernels import fused_experts
    (x, gate, up, down, weights), experts = problem(torch.float32, N=0)
    out = fused_experts(x, gate, up, down, weights, experts)
    assert out.shape == (0, x.shape[1])
    out.sum().backward()
    assert not gate.grad.any()


def test_the_moe_layer_gives_the_loops_output_through_the_fused_path():
    torch.manual_seed(0)
    config = RingLinearConfig.preset("tiny", hidden_size=64, moe_intermediate_size=32,
                                     moe_shared_expert_intermediate_size=32)
    moe = MoE(config)
    for p in moe.parameters():
        p.data.normal_(std=p.shape[-1] ** -0.5)
    moe = moe.to(DEVICE, torch.bfloat16)
    x = torch.randn(2, 13, 64, device=DEVICE, dtype=torch.bfloat16)
    e = moe.experts
    assert experts_kernel(TRITON, x, e.gate_proj, e.up_proj, e.down_proj, token_order=True) == "fused"
    outputs, grads = [], []
    for policy in (TRITON, KernelPolicy("torch")):
        xg = x.clone().requires_grad_()
        out = moe(xg, policy)
        out.float().square().sum().backward()
        outputs.append(out)
        grads.append([xg.grad, e.gate_proj.grad, e.down_proj.grad, moe.gate.weight.grad])
        moe.zero_grad()
    assert rel(outputs[0], outputs[1]) < 1e-2
    for a, b in zip(*grads):
        assert rel(a, b) < 3e-2


class Stand:
    def __init__(self, device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
        self.device, self.dtype, self.is_cuda = torch.device(device), dtype, device == "cuda"


@pytest.mark.parametrize("rows_keep_their_bits", [True, False])
def test_the_rule_takes_the_fused_path_for_bf16_tokens(rows_keep_their_bits, monkeypatch):
    """In invariant mode too where a row's products keep their bits whatever shares their tile (Hopper)."""
    import ringlinear.ops.policy as policy_module
    monkeypatch.setattr(policy_module, "rows_keep_their_bits", lambda device: rows_keep_their_bits)
    cuda, cpu = Stand(), Stand("cpu")
    for policy, x, kernel in ((KernelPolicy(), cuda, "fused"), (TRITON, cpu, "fused"),
                              (KernelPolicy(), Stand(dtype=torch.float32), "loop"),
                              (KernelPolicy(), cpu, "loop"), (KernelPolicy("torch"), cuda, "loop"),
                              (KernelPolicy(invariant=True), cuda,
                               "fused" if rows_keep_their_bits else "invariant_grouped_mm"),
                              (KernelPolicy(invariant=True), Stand(dtype=torch.float32), "invariant_grouped_mm"),
                              (KernelPolicy(fp8=True), cuda, "fp8_loop")):
        assert experts_kernel(policy, x, x, token_order=True) == kernel
    assert experts_kernel(KernelPolicy(), cuda, cuda) == "grouped_mm"  # rows already in expert order
    assert experts_kernel(KernelPolicy(invariant=True), cuda, cuda) == "invariant_grouped_mm"


def test_a_tokens_fused_output_does_not_depend_on_the_other_tokens(row_by_row_dot):
    """The fused kernels' tiles and sums are fixed by the shapes: with products whose rows keep their bits
    whatever shares their tile (Hopper; here the interpreter's dot one row at a time models it), a token's
    output alone is its output among others, bit for bit (the schedule, the row gathers, the epilogue and
    the fp32 sum in choice order depend on no other token): what invariant mode would need to take them."""
    from ringlinear.ops.moe_kernels import fused_experts
    (x, gate, up, down, weights), experts = problem(torch.bfloat16)
    with torch.no_grad():
        together = fused_experts(x, gate, up, down, weights, experts)
        for rows in ([0], [69], [3, 40, 41, 68]):
            alone = fused_experts(x[rows], gate, up, down, weights[rows], experts[rows])
            assert torch.equal(alone, together[rows])
