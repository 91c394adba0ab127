"""The fused path of the routed experts (`policy.experts_kernel` "fused"): Triton kernels from the
tokens in token order to Σ_k weight · expert(x), with no host sync (CUDA-graph capturable).

Today's grouped path copies x into expert order, runs three torch._grouped_mm with a separate SwiGLU
pass between them, gathers the rows back and sums them in fp32 (a bf16 → fp32 pass over N·k rows).
Here, for the N·k (token, choice) assignments sorted by expert (`moe.sort_by_expert`):

1. `_schedule_kernel`: from the counts [E] on the device, the row tiles of every expert (each expert's
   rows start a new tile of BLOCK_M): tile t → (expert, first row, end row), over a grid bounded by
   the shapes alone; tiles past the last are marked expert E and their programs return at once.
2. `_gate_up_kernel`: a program takes one tile's rows and BLOCK_N columns of the intermediate, loads
   its rows straight from x (row r is token order[r] // k, so no dispatched copy of x exists), runs
   the gate and up products in fp32 and writes h = act(gate) · up · weight in x's dtype, expert order;
   the gate and up products too (x's dtype) when a backward will need them.
3. `_down_kernel`: y = h @ down[e]ᵀ for each tile, expert order.
4. `_combine_kernel`: out[t] = Σ_c y[back[t·k + c]] over the choices c = 0..k-1 in order, in fp32,
   one write in x's dtype (no atomics: the sum's order is fixed).

The backward (`_FusedExperts`) recomputes h and the activation's derivative from the saved gate and
up products in one elementwise kernel (`_glu_backward_kernel`, which also gives the routing weights'
gradient), and runs the five products of dgrad and wgrad as the invariant GEMM's backward does
(`invariant_kernels.grouped_rows_times` and `grouped_outer`: torch._grouped_mm on CUDA bf16, else one
product per expert); the input's gradient is the
combine kernel's sum over a token's k rows of both its dgrad products.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .fused import POWLU_EXPONENT
from .invariant_kernels import grouped_outer, grouped_rows_times
from .launch import cdiv, next_power_of_2
from .moe import sort_by_expert
from .policy import KERNEL_DTYPES

ACTIVATIONS = ("silu", "powlu")
BLOCK_M = 128  # rows per tile: the schedule's, shared by both GEMMs
SCHEDULE_BLOCK = 64  # tiles per program of the schedule


@dataclass(frozen=True)
class TileConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# The fastest of seven candidates at Ring-mini's shapes, 4K and 32K tokens (H200, benchmarks/RESULTS.md,
# 2026-12-02): two warpgroups of 64 rows each; 128-row tiles beat 64-row ones by 1.2× at 32K tokens.
GATE_UP = TileConfig(block_n=128, block_k=64, num_warps=8, num_stages=3)
DOWN = TileConfig(block_n=256, block_k=64, num_warps=8, num_stages=3)
COMBINE_TOKENS, COMBINE_COLUMNS = 16, 256


def _staged(config: TileConfig, dtype: torch.dtype) -> TileConfig:
    """fp32 (tests only) has twice the bytes a tile: half the stages fit the shared memory."""
    return config if dtype != torch.float32 else TileConfig(config.block_n, config.block_k, config.num_warps,
                                                           max(2, config.num_stages // 2))


# -- activations (fp32) ----------------------------------------------------------------------------

_POWLU_M = tl.constexpr(POWLU_EXPONENT)
_TINY = tl.constexpr(torch.finfo(torch.float32).tiny)


@triton.jit
def _gate(z, ACTIVATION: tl.constexpr):
    """act(z) as `fused.GATES` computes it in fp32: SiLU, or PowLU's z^(m/(√z+1))·σ(z) above zero."""
    s = tl.sigmoid(z)
    if ACTIVATION == "silu":
        f = z * s
    else:
        base = tl.maximum(z, _TINY)
        f = tl.where(z > 0, tl.exp(_POWLU_M * tl.log(base) / (tl.sqrt(base) + 1)) * s, z * s)
    return f


@triton.jit
def _gate_derivative(z, f, ACTIVATION: tl.constexpr):
    """d act / dz at z, given f = act(z)."""
    s = tl.sigmoid(z)
    derivative = s * (1 + z * (1 - s))  # SiLU's
    if ACTIVATION == "powlu":  # log f = m·log z / (√z+1) + log σ(z) above zero
        base = tl.maximum(z, _TINY)
        root = tl.sqrt(base)
        power = _POWLU_M * ((root + 1) / base - tl.log(base) / (2 * root)) / ((root + 1) * (root + 1))
        derivative = tl.where(z > 0, f * (power + 1 - s), derivative)
    return derivative


# -- forward ---------------------------------------------------------------------------------------

@triton.jit
def _schedule_kernel(counts, schedule, T, E, E_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr):
    """schedule [3, T] int32: for row tile t, its expert (E past the last tile), first row and end row
    (exclusive), rows sorted by expert with counts[e] rows for expert e."""
    experts = tl.arange(0, E_P2)
    real = experts < E
    sizes = tl.load(counts + experts, mask=real, other=0).to(tl.int32)
    tiles = (sizes + BLOCK_M - 1) // BLOCK_M
    tiles_end = tl.cumsum(tiles, 0)
    rows_end = tl.cumsum(sizes, 0)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    # experts wholly before tile t; empty experts end where the one before them does, so they count too
    expert = tl.sum(((tiles_end[None, :] <= t[:, None]) & real[None, :]).to(tl.int32), 1)
    mine = experts[None, :] == expert[:, None]
    end = tl.sum(tl.where(mine, rows_end[None, :], 0), 1)
    first_tile = tl.sum(tl.where(mine, (tiles_end - tiles)[None, :], 0), 1)
    start = end - tl.sum(tl.where(mine, sizes[None, :], 0), 1) + (t - first_tile) * BLOCK_M
    start = tl.where(expert < E, start, 0)
    end = tl.where(expert < E, tl.minimum(end, start + BLOCK_M), 0)
    ok = t < T
    tl.store(schedule + t, expert, mask=ok)
    tl.store(schedule + T + t, start, mask=ok)
    tl.store(schedule + 2 * T + t, end, mask=ok)


def row_tiles(M: int, E: int) -> int:
    """A bound on the row tiles from the shapes alone: an expert of n rows takes ⌈n / BLOCK_M⌉ ≤
    (n + BLOCK_M - 1) / BLOCK_M tiles, and at most min(E, M) experts hold rows."""
    return (M + min(E, M) * (BLOCK_M - 1)) // BLOCK_M


def schedule_tiles(counts: Tensor, M: int) -> Tensor:
    """counts [E] (int, on the device, summing to M) -> [3, row_tiles(M, E)] int32: each row tile's
    expert (E for the tiles past the last), first row and end row."""
    E = counts.shape[0]
    T = row_tiles(M, E)
    schedule = torch.empty(3, T, device=counts.device, dtype=torch.int32)
    _schedule_kernel[(cdiv(T, SCHEDULE_BLOCK),)](counts, schedule, T, E, E_P2=next_power_of_2(E),
                                                 BLOCK_M=BLOCK_M, BLOCK_T=SCHEDULE_BLOCK)
    return schedule


@triton.jit
def program_tile(schedule, T, N, BLOCK_N: tl.constexpr):
    """This program's row tile (its expert, first and end row; expert E past the last tile) and column
    tile: program p takes row tile p // n_tiles and column tile p % n_tiles (a row tile's column
    programs run together, so its rows are read from L2)."""
    n_tiles = tl.cdiv(N, BLOCK_N)
    row_tile = tl.program_id(0) // n_tiles
    expert = tl.load(schedule + row_tile)
    start, end = tl.load(schedule + T + row_tile), tl.load(schedule + 2 * T + row_tile)
    return expert, start, end, tl.program_id(0) % n_tiles


@triton.jit
def _gate_up_kernel(x, order, weights, w_gate, w_up, h, g_out, u_out, schedule, T, E, K, N, k,
                    ACTIVATION: tl.constexpr, SAVE: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """h[r, n] = act(x[tok] · w_gate[e, n]) · (x[tok] · w_up[e, n]) · weights[order[r]] for the rows r
    of expert e, tok = order[r] // k; x [tokens, K], w_* [E, N, K], h (and g_out, u_out: the two
    products, with SAVE) [M, N], all contiguous. Programs: `program_tile`."""
    expert, start, end, pid_n = program_tile(schedule, T, N, BLOCK_N)
    if expert >= E:
        return
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    slot = tl.load(order + rows, mask=row_ok, other=0)  # the (token, choice) index, int64
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    p_x = x + (slot // k)[:, None] * K + ks[None, :]
    w_offsets = expert.to(tl.int64) * N * K + cols[None, :].to(tl.int64) * K + ks[:, None]
    p_g = w_gate + w_offsets
    p_u = w_up + w_offsets
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        a = tl.load(p_x, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b_mask = k_ok[:, None] & col_ok[None, :]
        acc_g = tl.dot(a, tl.load(p_g, mask=b_mask, other=0.0), acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, tl.load(p_u, mask=b_mask, other=0.0), acc_u, input_precision=PRECISION)
        p_x += BLOCK_K
        p_g += BLOCK_K
        p_u += BLOCK_K
    scale = tl.load(weights + slot, mask=row_ok, other=0.0).to(tl.float32)
    out = _gate(acc_g, ACTIVATION) * acc_u * scale[:, None]
    offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    tl.store(h + offsets, out.to(h.dtype.element_ty), mask=mask)
    if SAVE:
        tl.store(g_out + offsets, acc_g.to(g_out.dtype.element_ty), mask=mask)
        tl.store(u_out + offsets, acc_u.to(u_out.dtype.element_ty), mask=mask)


@triton.jit
def _down_kernel(h, w, y, schedule, T, E, K, N, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[r] = h[r] @ w[e]ᵀ for the rows r of expert e; h [M, K], w [E, N, K], y [M, N] contiguous.
    Programs: `program_tile`."""
    expert, start, end, pid_n = program_tile(schedule, T, N, BLOCK_N)
    if expert >= E:
        return
    rows = (start + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    p_h = h + rows[:, None] * K + ks[None, :]
    p_w = w + expert.to(tl.int64) * N * K + cols[None, :].to(tl.int64) * K + ks[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        a = tl.load(p_h, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(a, tl.load(p_w, mask=k_ok[:, None] & col_ok[None, :], other=0.0), acc, input_precision=PRECISION)
        p_h += BLOCK_K
        p_w += BLOCK_K
    tl.store(y + rows[:, None] * N + cols[None, :], acc.to(y.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _combine_kernel(a, b, back, out, tokens, H, k: tl.constexpr, TWO: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[t] = Σ_c a[back[t·k + c]] (+ b[back[t·k + c]] with TWO) for c = 0..k-1 in order, in fp32;
    a, b [tokens·k, H] in expert order, out [tokens, H], contiguous."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_ok = t < tokens
    mask = t_ok[:, None] & (cols < H)[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    for c in tl.static_range(k):
        row = tl.load(back + t.to(tl.int64) * k + c, mask=t_ok, other=0)
        offsets = row[:, None] * H + cols[None, :]
        acc += tl.load(a + offsets, mask=mask, other=0.0).to(tl.float32)
        if TWO:
            acc += tl.load(b + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + t.to(tl.int64)[:, None] * H + cols[None, :], acc.to(out.dtype.element_ty), mask=mask)


def combine(a: Tensor, back: Tensor, k: int, b: Tensor | None = None) -> Tensor:
    """a (and b) [N·k, H] in expert order, back [N·k] (the row of each (token, choice)) -> [N, H] in
    a's dtype: each token's k rows (of a + b) summed in fp32, choices in order."""
    M, H = a.shape
    out = torch.empty(M // k, H, device=a.device, dtype=a.dtype)
    if M:
        grid = (cdiv(M // k, COMBINE_TOKENS), cdiv(H, COMBINE_COLUMNS))
        _combine_kernel[grid](a, a if b is None else b, back, out, M // k, H, k=k, TWO=b is not None,
                              BLOCK_T=COMBINE_TOKENS, BLOCK_H=COMBINE_COLUMNS)
    return out


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs


def _forward(x: Tensor, gate: Tensor, up: Tensor, down: Tensor, weights: Tensor, order: Tensor, back: Tensor,
             counts: Tensor, k: int, activation: str, save: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The four launches: out [N, hidden], and the gate and up products [N·k, inter] if `save`."""
    M, (E, inter, hidden) = order.shape[0], gate.shape
    if M == 0:
        return x.new_zeros(x.shape), None, None
    schedule = schedule_tiles(counts, M)
    T = schedule.shape[1]
    h = torch.empty(M, inter, device=x.device, dtype=x.dtype)
    g, u = (torch.empty_like(h), torch.empty_like(h)) if save else (None, None)
    c = _staged(GATE_UP, x.dtype)
    _gate_up_kernel[(T * cdiv(inter, c.block_n),)](
        x, order, weights, gate, up, h, h if g is None else g, h if u is None else u, schedule, T, E, hidden, inter, k,
        ACTIVATION=activation, SAVE=save, PRECISION=_precision(x.dtype),
        BLOCK_M=BLOCK_M, BLOCK_N=c.block_n, BLOCK_K=c.block_k, num_warps=c.num_warps, num_stages=c.num_stages)
    y = torch.empty(M, hidden, device=x.device, dtype=x.dtype)
    c = _staged(DOWN, x.dtype)
    _down_kernel[(T * cdiv(hidden, c.block_n),)](
        h, down, y, schedule, T, E, inter, hidden, PRECISION=_precision(x.dtype),
        BLOCK_M=BLOCK_M, BLOCK_N=c.block_n, BLOCK_K=c.block_k, num_warps=c.num_warps, num_stages=c.num_stages)
    return combine(y, back, k), g, u


# -- backward --------------------------------------------------------------------------------------

@triton.jit
def _glu_backward_kernel(g, u, dh, order, weights, h, dg, du, dweights, M, N, ACTIVATION: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """From the saved products g, u and dh = dL/dh [M, N] (expert order): h = act(g)·u·w again (for
    down's weight gradient), dg, du [M, N], and dweights[order[r]] = Σ_n dh·act(g)·u (fp32), with
    w = weights[order[r]]."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = rows < M
    slot = tl.load(order + rows, mask=row_ok, other=0)
    scale = tl.load(weights + slot, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    dscale = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, N, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (cols < N)[None, :]
        offsets = rows[:, None] * N + cols[None, :]
        z = tl.load(g + offsets, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(u + offsets, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(dh + offsets, mask=mask, other=0.0).to(tl.float32)
        f = _gate(z, ACTIVATION)
        tl.store(h + offsets, (f * up * scale).to(h.dtype.element_ty), mask=mask)
        dscale += tl.sum(d * f * up, 1)
        tl.store(dg + offsets, (d * scale * up * _gate_derivative(z, f, ACTIVATION)).to(dg.dtype.element_ty),
                 mask=mask)
        tl.store(du + offsets, (d * scale * f).to(du.dtype.element_ty), mask=mask)
    tl.store(dweights + slot, dscale.to(dweights.dtype.element_ty), mask=row_ok)


class _FusedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, gate: Tensor, up: Tensor, down: Tensor, weights: Tensor, experts: Tensor,
                activation: str) -> Tensor:
        N, k = experts.shape
        order, counts, back = sort_by_expert(experts, gate.shape[0])
        flat = weights.flatten()
        out, g, u = _forward(x, gate, up, down, flat, order, back, counts, k, activation, save=True)
        ctx.save_for_backward(x, gate, up, down, flat, order, back, counts, g, u)
        ctx.k, ctx.activation, ctx.weights_shape = k, activation, weights.shape
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        x, gate, up, down, weights, order, back, counts, g, u = ctx.saved_tensors
        need_x, need_gate, need_up, need_down, need_weights = ctx.needs_input_grad[:5]
        M, k = order.shape[0], ctx.k
        if M == 0:
            return (torch.zeros_like(x), torch.zeros_like(gate), torch.zeros_like(up), torch.zeros_like(down),
                    torch.zeros(ctx.weights_shape, device=x.device, dtype=weights.dtype), None, None)
        tokens = order // k
        dy = dout.contiguous()[tokens]  # [M, hidden], expert order
        dh = grouped_rows_times(dy, down, counts)
        h, dg, du = torch.empty_like(g), torch.empty_like(g), torch.empty_like(g)
        dweights = torch.empty_like(weights)
        rows, columns = 16, min(128, next_power_of_2(g.shape[1]))
        _glu_backward_kernel[(cdiv(M, rows),)](g, u, dh, order, weights, h, dg, du, dweights, M, g.shape[1],
                                               ACTIVATION=ctx.activation, BLOCK_R=rows, BLOCK_C=columns)
        x_sorted = x[tokens] if need_gate or need_up else None
        dx = combine(grouped_rows_times(dg, gate, counts), back, k, grouped_rows_times(du, up, counts)) \
            if need_x else None
        return (dx,
                grouped_outer(dg, x_sorted, counts) if need_gate else None,
                grouped_outer(du, x_sorted, counts) if need_up else None,
                grouped_outer(dy, h, counts) if need_down else None,
                dweights.view(ctx.weights_shape) if need_weights else None, None, None)


def fused_experts(x: Tensor, gate: Tensor, up: Tensor, down: Tensor, weights: Tensor, experts: Tensor,
                  activation: str = "silu") -> Tensor:
    """x [N, hidden]; gate/up [E, inter, hidden], down [E, hidden, inter] in x's dtype (fp16, bf16, fp32);
    weights [N, k] (fp32), experts [N, k] (int64) -> [N, hidden] in x's dtype: Σ_k weight · expert(x),
    the expert being down(act(gate x) · up x) with act "silu" (SwiGLU) or "powlu", summed over k in
    fp32. Differentiable in x, the three weights and the routing weights; the gate and up products
    are kept for the backward only when one is needed."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dtype not in KERNEL_DTYPES or any(w.dtype != x.dtype for w in (gate, up, down)):
        raise ValueError(f"x and the expert weights must share a dtype of {KERNEL_DTYPES}")
    x, gate, up, down = (t.contiguous() for t in (x, gate, up, down))
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, gate, up, down, weights)):
        return _FusedExperts.apply(x, gate, up, down, weights, experts, activation)
    order, counts, back = sort_by_expert(experts, gate.shape[0])
    return _forward(x, gate, up, down, weights.flatten(), order, back, counts, experts.shape[1], activation,
                    save=False)[0]
