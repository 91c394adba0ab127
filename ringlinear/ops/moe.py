"""The routed experts: Σ_k weight · expert(x) over each token's k chosen experts.

`routed_experts` starts from the tokens in token order. For bf16 on the Triton backend (CUDA, or the
interpreter on a CPU), not FP8 and not invariant (except on Hopper, where the fused kernels keep a row's
bits: `policy.experts_kernel`), it runs the fused kernels of `moe_kernels`, which
read the tokens' rows in place and sum each token's k outputs in fp32 as they gather them. Every other
policy takes `dispatched_experts`: the rows are copied into expert order (`dispatch_rows`),
`grouped_glu` runs the gated MLPs over them, and the outputs are gathered back (`combine_rows`) and
summed in fp32.

`grouped_glu` over rows grouped by expert has five forms with one signature: the reference loops over
experts (it reads the row counts on the host); the grouped form runs each projection as one
`torch._grouped_mm` over all experts with the group offsets on the device, so it never synchronises
and can be captured in a CUDA graph; the invariant form runs the grouped products of
`invariant_kernels` (likewise without a sync); the FP8 loop runs each expert's blockwise-FP8 products
(`ops.fp8`); and e4m3 weights (serving) run one grouped blockwise-FP8 product per projection over all
experts, with no sync. The kernel policy picks one (`ops.policy`); in invariant mode on the torch
backend the loop's products become products of one fixed shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .fp8 import expert_schedule, fp8_grouped_gemm, fp8_linear, quantize_rows
from .fused import glu
from .policy import KernelPolicy, experts_kernel


class _Dispatch(torch.autograd.Function):
    """x[order // k]: each token's row once per chosen expert, grouped by expert. The backward sums a
    token's k row gradients after a gather; indexing's own backward is an index_put with
    accumulation (a sort and atomics: 4% of a 1b-model training step on the H200)."""

    @staticmethod
    def forward(ctx, x: Tensor, order: Tensor, back: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(back)
        ctx.k = k
        return x[order // k]

    @staticmethod
    def backward(ctx, dy: Tensor):
        (back,) = ctx.saved_tensors
        return dy[back].view(-1, ctx.k, dy.shape[-1]).sum(1), None, None, None


class _Combine(torch.autograd.Function):
    """y_sorted[back]: the expert rows back in token order; the backward is the opposite gather."""

    @staticmethod
    def forward(ctx, y_sorted: Tensor, order: Tensor, back: Tensor) -> Tensor:
        ctx.save_for_backward(order)
        return y_sorted[back]

    @staticmethod
    def backward(ctx, dy: Tensor):
        (order,) = ctx.saved_tensors
        return dy[order], None, None


def sort_by_expert(experts: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """experts [N, k] -> order [N·k] (the (token, choice) assignments, flattened, grouped by expert with
    token order kept inside), counts [E] (int64, on the device) and back (order's inverse permutation)."""
    flat = experts.flatten()
    order = flat.argsort(stable=True)
    # bincount on CUDA reads the largest id on the host; scatter_add stays on the device
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    # back to token order by a gather (an index_put of whole rows is several times slower)
    back = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))
    return order, counts, back


def routed_experts(x: Tensor, weights: Tensor, experts: Tensor, gate: Tensor, up: Tensor, down: Tensor,
                   policy: KernelPolicy = KernelPolicy(), activation: str = "silu",
                   weight_scales: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """x [N, hidden], weights/experts [N, k] (the router's), gate/up [E, inter, hidden], down [E, hidden,
    inter] -> [N, hidden] in x's dtype: Σ_k weight · expert(x), summed over k in a fixed order in the
    weights' dtype (fp32, or fp64 for an fp64 model). The fused kernels where the policy picks them,
    else `dispatched_experts`."""
    if experts_kernel(policy, x, gate, up, down, token_order=True) == "fused":
        from .moe_kernels import fused_experts
        return fused_experts(x, gate, up, down, weights, experts, activation)
    return dispatched_experts(x, weights, experts, gate, up, down, policy, activation, weight_scales)


def dispatched_experts(x: Tensor, weights: Tensor, experts: Tensor, gate: Tensor, up: Tensor, down: Tensor,
                       policy: KernelPolicy = KernelPolicy(), activation: str = "silu",
                       weight_scales: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """`routed_experts` through a copy of x in expert order and `grouped_glu` (the policy's form); the
    outputs gathered back to token order and summed."""
    N, k = experts.shape
    order, counts, back = sort_by_expert(experts, gate.shape[0])
    y_sorted = grouped_glu(dispatch_rows(x, order, back, k), gate, up, down, counts, weights.flatten()[order],
                           policy, activation, weight_scales)
    return combine_rows(y_sorted, order, back).view(N, k, -1).sum(1, dtype=weights.dtype).to(x.dtype)


def dispatch_rows(x: Tensor, order: Tensor, back: Tensor, k: int) -> Tensor:
    """x [N, hidden] -> [N·k, hidden]: row r is token order[r] // k. `order` sorts the N·k (token,
    choice) assignments by expert and `back` is its inverse permutation. Gathers both ways."""
    return _Dispatch.apply(x, order, back, k)


def combine_rows(y_sorted: Tensor, order: Tensor, back: Tensor) -> Tensor:
    """The inverse of `dispatch_rows`'s order: [N·k, hidden] sorted by expert -> (token, choice) order."""
    return _Combine.apply(y_sorted, order, back)


def grouped_glu(x: Tensor, gate: Tensor, up: Tensor, down: Tensor, counts: Tensor, scales: Tensor,
                policy: KernelPolicy = KernelPolicy(), activation: str = "silu",
                weight_scales: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """The gated MLP (`activation`: "silu" for SwiGLU, "powlu") of each expert over its rows, each row
    scaled by its routing weight: x [M, hidden] sorted by expert, `counts[e]` rows for expert e;
    gate/up [E, inter, hidden], down [E, hidden, inter]; scales [M] fp32. Returns [M, hidden]. The
    scale multiplies the intermediate (inter wide, a quarter of hidden at Ring-mini's shapes) in fp32,
    so no fp32 copy of the output is made. e4m3 weights come with their 128×128 `weight_scales`
    [E, ·, ·] for gate, up and down."""
    match experts_kernel(policy, x, gate, up, down):
        case "fp8_grouped":
            return grouped_glu_fp8_grouped(x, gate, up, down, counts, scales, policy, activation, weight_scales)
        case "fp8_loop":
            return grouped_glu_fp8(x, gate, up, down, counts, scales, policy, activation, weight_scales)
        case "invariant_grouped_mm":
            return grouped_glu_invariant(x, gate, up, down, counts, scales, policy, activation)
        case "grouped_mm":
            return grouped_glu_grouped_mm(x, gate, up, down, counts, scales, policy, activation)
        case "loop":
            return grouped_glu_loop(x, gate, up, down, counts, scales, policy, activation)


def grouped_glu_loop(x: Tensor, gate: Tensor, up: Tensor, down: Tensor, counts: Tensor,
                     scales: Tensor, policy: KernelPolicy = KernelPolicy(), activation: str = "silu") -> Tensor:
    outputs = []
    sizes = counts.tolist()
    # unbind, not gate[e]: indexing's backward would fill a zero gradient of all E experts per expert
    for rows, s, g, u, d in zip(x.split(sizes), scales.split(sizes), gate.unbind(), up.unbind(), down.unbind()):
        if rows.shape[0]:
            outputs.append(F.linear(glu(F.linear(rows, g), F.linear(rows, u), s, activation, policy=policy), d))
    return torch.cat(outputs) if outputs else x.new_zeros(0, down.shape[1])


def grouped_glu_grouped_mm(x: Tensor, gate: Tensor, up: Tensor, down: Tensor, counts: Tensor,
                           scales: Tensor, policy: KernelPolicy = KernelPolicy(), activation: str = "silu") -> Tensor:
    offsets = counts.cumsum(0).to(torch.int32)  # end row of each expert's group
    h = glu(torch._grouped_mm(x, gate.transpose(1, 2), offs=offsets),
            torch._grouped_mm(x, up.transpose(1, 2), offs=offsets), scales, activation, policy=policy)
    return torch._grouped_mm(h, down.transpose(1, 2), offs=offsets)


def grouped_glu_invariant(x: Tensor, gate: Tensor, up: Tensor, down: Tensor, counts: Tensor, scales: Tensor,
                          policy: KernelPolicy = KernelPolicy(invariant=True), activation: str = "silu") -> Tensor:
    from .invariant_kernels import invariant_grouped_mm
    h = glu(invariant_grouped_mm(x, gate, counts), invariant_grouped_mm(x, up, counts), scales, activation,
            policy=policy)
    return invariant_grouped_mm(h, down, counts)


def grouped_glu_fp8(x: Tensor, gate: Tensor, up: Tensor, down: Tensor, counts: Tensor, scales: Tensor,
                    policy: KernelPolicy, activation: str = "silu",
                    weight_scales: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    sizes = counts.tolist()
    per_expert = [w.unbind() for w in (gate, up, down)]
    per_expert += [s.unbind() for s in weight_scales] if weight_scales is not None else [[None] * len(sizes)] * 3
    outputs = []
    for rows, s, g, u, d, gs, us, ds in zip(x.split(sizes), scales.split(sizes), *per_expert):
        if rows.shape[0]:
            h = glu(fp8_linear(rows, g, None, gs, policy=policy), fp8_linear(rows, u, None, us, policy=policy), s,
                    activation, policy=policy)
            outputs.append(fp8_linear(h, d, None, ds, policy=policy))
    return torch.cat(outputs) if outputs else x.new_zeros(0, down.shape[1])


def grouped_glu_fp8_grouped(x: Tensor, gate: Tensor, up: Tensor, down: Tensor, counts: Tensor, scales: Tensor,
                            policy: KernelPolicy, activation: str = "silu",
                            weight_scales: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """`grouped_glu_fp8`'s numbers for e4m3 weights without its loop: x and h quantized once (a 1×128 block
    lies within one row, so each expert's rows get the codes the loop gives them), then one grouped FP8
    GEMM per projection."""
    if weight_scales is None:
        raise ValueError("e4m3 expert weights need their weight_scales")
    gate_scale, up_scale, down_scale = weight_scales
    qx, sx = quantize_rows(x, policy)
    schedule = expert_schedule(qx, counts, policy)  # the three products' rows are the same
    h = glu(fp8_grouped_gemm(qx, sx, gate, gate_scale, counts, x.dtype, policy, schedule),
            fp8_grouped_gemm(qx, sx, up, up_scale, counts, x.dtype, policy, schedule), scales, activation,
            policy=policy)
    qh, sh = quantize_rows(h, policy)
    return fp8_grouped_gemm(qh, sh, down, down_scale, counts, x.dtype, policy, schedule)
