"""Triton kernels of batch-invariant mode on CUDA: a row's numbers are computed by one instruction
sequence whatever the other rows are, in one launch (the PyTorch form, `batch_invariant._in_blocks`,
gets there with a Python loop over fixed-shape blocks).

- `invariant_grouped_mm`: rows sorted by group, row r of group e times w[e]ᵀ (E = 1: F.linear). No
  autotuning: an output element is a sum over K in a fixed order, each step a `tl.dot` whose
  per-element arithmetic does not depend on the other rows of the tile (zeros, or rows of other
  tokens); the tile changes with the rows only where that is measured to keep the bits (`mm_config`).
  K is cut into slices by the weight's shape alone (`k_slices`), each summed from zero and then added
  in order: a decode step's few rows run a program per slice (its GEMV otherwise waits on one long K
  loop on a few SMs) and sum the slices after, a training batch sums them in its programs; the same
  additions either way.
- `row_sum` (and `softmax` from it): one program per row, a fixed block over the columns, and a row
  longer than `ROW_CHUNK` in chunks of it, a program each, their sums added in order (a function of
  the row length only); torch's own reductions split a row over more threads when there are few rows.
- `key_block_attention`: `attention.attention_by_key_blocks` on the tensor cores, FlashAttention's
  online softmax with one tile shape for every call: a program takes a tile of one sequence's queries
  (the query heads of a KV head folded into its rows, a decode step's tile padded with masked rows)
  and visits the key blocks at fixed positions from the sequence's start, in order.

A `tl.sum` reduces in the order of its tile's layout, and Triton picks the layout of loads by what it
knows of the pointers (16-byte alignment) and of the integer arguments (divisible by 16, equal to 1).
So every such fact that varies with the batch is made fixed: tensors whose elements are summed are
passed contiguous from an aligned address, and integers that vary (row counts, table strides) are
left unspecialised. Lengths, flags and shapes of the model (K, N, D, the tile) select the binary.

The backward passes need no invariance: they are ordinary PyTorch products (torch._grouped_mm for
the grouped GEMM on CUDA bf16), else this file's GEMM.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .batch_invariant import KEY_BLOCK
from .launch import cdiv, needs_grad, next_power_of_2
from .policy import KERNEL_DTYPES, grouped_mm_gradients_kernel, rows_keep_their_bits


def _aligned(x: Tensor) -> Tensor:
    """x contiguous from a 16-byte-aligned address: a view at another offset would compile another
    variant of a kernel, with another load layout and so another order of its sums."""
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


# -- grouped GEMM ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class MMConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Rows from which Hopper takes the large tile: below, its 128 × 128 tiles leave SMs idle (check_invariant.py --tiles)
LARGE_TILE_ROWS = 1024
_TILE = MMConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4)
_LARGE_TILE = MMConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)
_FP32_TILE = MMConfig(block_m=64, block_n=64, block_k=32, num_warps=4, num_stages=3)
_FP32_LARGE_TILE = MMConfig(block_m=128, block_n=128, block_k=32, num_warps=8, num_stages=2)


def mm_config(dtype: torch.dtype, rows: int = 0, device: torch.device | None = None) -> MMConfig:
    """The tile of a product of `rows` rows. fp32 runs IEEE products on CUDA cores, not tensor cores, with
    twice the bytes per element: smaller tiles. Where a row's bits do not depend on the tile
    (`policy.rows_keep_their_bits`: Hopper) many rows take a larger tile (fp32 on the router's product:
    0.270 ms vs 0.346 at 4,096 rows, the same bits; `benchmarks/check_invariant.py --tiles`,
    `--fp32-tiles`); anywhere else one tile, since another could give other bits."""
    large = rows >= LARGE_TILE_ROWS and device is not None and rows_keep_their_bits(device)
    if dtype == torch.float32:
        return _FP32_LARGE_TILE if large else _FP32_TILE
    return _LARGE_TILE if large else _TILE


# K is cut into slices at multiples of this (every tile's block_k divides it), each slice summed from
# zero and the slices added in order, so the split is a property of the weight's shape alone
SLICE_ALIGN = 64
SLICE_MIN_K = 128  # a slice is at least this much of K
# slices double until N · slices reaches this: a one-row-tile product's N / 128 programs times its slices
# then fill an H200's 132 SMs
SPLIT_TARGET_COLUMNS = 16384


def k_slices(E: int, N: int, K: int) -> tuple[int, int]:
    """(slices, slice length) of the reduction of a product by weights [E, N, K]: a function of the weight's
    shape only, never of the rows, so a row's bits are the same in a decode step and in training. One
    weight (E = 1): enough slices for a one-row-tile product to fill the GPU (N · slices ≥
    SPLIT_TARGET_COLUMNS), each at least SLICE_MIN_K long, since a decode step's GEMV is the latency of its
    K loop; summing slices costs a training batch's products 20-35% (H200, benchmarks/RESULTS.md). Grouped
    weights (experts): one slice, as a decode step's experts already give one row tile each."""
    slices = 1
    while E == 1 and slices * 2 * SLICE_MIN_K <= K and N * slices < SPLIT_TARGET_COLUMNS:
        slices *= 2
    length = cdiv(cdiv(K, slices), SLICE_ALIGN) * SLICE_ALIGN
    return cdiv(K, length), length


@triton.jit
def _tile_rows(counts, M, E, pid_m, GROUPED: tl.constexpr, E_P2: tl.constexpr, BLOCK_M: tl.constexpr):
    """Program row tile pid_m's group, first row and end row (group E: past the last tile)."""
    if GROUPED:
        # each program finds its group from the counts alone: no host sync, nothing prepared by torch
        groups = tl.arange(0, E_P2)
        sizes = tl.load(counts + groups, mask=groups < E, other=0).to(tl.int64)
        tiles = (sizes + BLOCK_M - 1) // BLOCK_M
        tile_end = tl.cumsum(tiles, 0)
        group = tl.sum((tile_end <= pid_m).to(tl.int32), 0)  # groups wholly before this tile
        mine = groups == group
        row_end = tl.sum(tl.where(mine, tl.cumsum(sizes, 0), 0), 0)
        first_tile = tl.sum(tl.where(mine, tile_end - tiles, 0), 0)
        row_start = row_end - tl.sum(tl.where(mine, sizes, 0), 0) + (pid_m - first_tile) * BLOCK_M
    else:
        group = pid_m * 0
        row_end = M
        row_start = pid_m.to(tl.int64) * BLOCK_M
    return group, row_start, row_end


@triton.jit(do_not_specialize=["M"])
def _grouped_mm_kernel(x, w, out, counts, M, N, K, E, stride_we, stride_wn, stride_wk, slice_len,
                       GROUPED: tl.constexpr, E_P2: tl.constexpr, PRECISION: tl.constexpr, SLICED: tl.constexpr,
                       SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[r] = x[r] @ w[e]ᵀ for the rows r of group e; x [M, K] contiguous, w [E, N, K] strided.
    Program (i, j[, s]): the i-th row tile over all groups (each group starts a new tile), the j-th tile
    of N. SLICED: K in slices of `slice_len`, each a chain of `tl.dot`s from zero; the total starts at
    zero and adds the slices in order (else one chain over K is the total). SPLIT: program s computes
    slice s alone into out [slices, M, N] fp32, and `_sum_slices_kernel` adds them; else the program
    adds each slice to the total as its loop completes it and writes out [M, N]. Without GROUPED there
    is one group of all M rows."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    group, row_start, row_end = _tile_rows(counts, M, E, pid_m, GROUPED, E_P2, BLOCK_M)
    if group >= E:  # past the last tile: the grid is an upper bound
        return
    w += group.to(tl.int64) * stride_we
    rows = row_start + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < row_end
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    k_start, k_end = 0, K
    if SPLIT:
        k_start = tl.program_id(2) * slice_len
        k_end = tl.minimum(k_start + slice_len, K)
    p_x = x + rows[:, None] * K + (k_start + ks)[None, :]
    p_w = w + cols[None, :] * stride_wn + (k_start + ks)[:, None] * stride_wk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        a = tl.load(p_x, mask=row_ok[:, None] & (ks[None, :] < k_end - k0), other=0.0)
        b = tl.load(p_w, mask=(ks[:, None] < k_end - k0) & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        p_x += BLOCK_K
        p_w += BLOCK_K * stride_wk
        if SLICED and not SPLIT:
            if (k0 + BLOCK_K) % slice_len == 0 or k0 + BLOCK_K >= K:  # a slice complete: into the total
                total += acc
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if SPLIT:
        tl.store(out + (tl.program_id(2) * M + rows[:, None]) * N + cols[None, :], acc, mask=mask)
    else:
        tl.store(out + rows[:, None] * N + cols[None, :], (total if SLICED else acc).to(out.dtype.element_ty),
                 mask=mask)


@triton.jit
def _sum_slices_kernel(partial, out, MN, SLICES: tl.constexpr, BLOCK: tl.constexpr):
    """out = ((0 + partial[0]) + partial[1]) + ..., the sum a SPLIT=False program makes, partial
    [SLICES, MN] fp32, cast to out's dtype."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SLICES):
        acc += tl.load(partial + s * MN + offsets, mask=ok, other=0.0)
    tl.store(out + offsets, acc.to(out.dtype.element_ty), mask=ok)


def split_programs(programs: int, device: torch.device) -> bool:
    """Whether a product of `programs` row-by-column tiles runs one program per slice (then sums the
    slices): when the tiles alone leave half the SMs idle (H200: a 64-row product 2048 → 2048 takes 7.7 µs
    split, 14 µs not). Either way gives the same bits; on the CPU (the interpreter) the small products
    split, so that tests meet both."""
    return programs < (_multiprocessors(device.index or 0) // 2 if device.type == "cuda" else 4)


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count  # a host call per product otherwise


def _grouped_mm(x: Tensor, w: Tensor, counts: Tensor | None, config: MMConfig | None = None,
                split: bool | None = None, slices: tuple[int, int] | None = None) -> Tensor:
    """The launch: x [M, K], w [E, N, K] any strides; counts on x's device. `config`: the dtype's tile
    unless given (benchmarks/check_invariant.py --tiles times candidates); `split`: whether each slice of
    K takes its own programs (`split_programs` decides unless given); `slices`: (count, length) instead
    of `k_slices` (check_invariant.py --slices times choices)."""
    x = _aligned(x)
    M, K = x.shape
    E, N = w.shape[0], w.shape[1]
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if M == 0:
        return out
    c = config or mm_config(x.dtype, M, x.device)
    # row tiles over all groups: a group of n rows takes ceil(n / block_m) ≤ (n + block_m - 1) / block_m,
    # and at most min(E, M) groups hold rows; a bound from the shapes alone (CUDA-graph safe)
    groups = 1 if counts is None else min(E, M)
    grid = ((M + groups * (c.block_m - 1)) // c.block_m, cdiv(N, c.block_n))
    slices, length = slices or k_slices(E, N, K)
    split = slices > 1 and (split_programs(grid[0] * grid[1], x.device) if split is None else split)
    target = torch.empty(slices, M, N, device=x.device, dtype=torch.float32) if split else out
    _grouped_mm_kernel[(*grid, slices) if split else grid](
        x, w, target, x if counts is None else counts, M, N, K, E, w.stride(0), w.stride(1), w.stride(2), length,
        GROUPED=counts is not None, E_P2=next_power_of_2(E),
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # tf32 is ignored for 16-bit inputs
        SLICED=slices > 1, SPLIT=split,
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, num_warps=c.num_warps, num_stages=c.num_stages)
    if split:
        _sum_slices_kernel[(cdiv(M * N, SUM_BLOCK),)](target, out, M * N, SLICES=slices, BLOCK=SUM_BLOCK)
    return out


SUM_BLOCK = 1024


class _GroupedMMFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, counts: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, w, counts)
        return _grouped_mm(x, w, counts)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, w, counts = ctx.saved_tensors
        return *_grouped_mm_gradients(dy.contiguous(), x, w, counts, *ctx.needs_input_grad[:2]), None


def _grouped_mm_gradients(dy: Tensor, x: Tensor, w: Tensor, counts: Tensor | None, need_dx: bool,
                          need_dw: bool) -> tuple[Tensor | None, Tensor | None]:
    """dx [M, K] and dw [E, N, K] of out = x @ w[e]ᵀ per group. Gradients need no invariance, so they take
    the fast products: one matmul each for one group, else `grouped_rows_times` and `grouped_outer`."""
    if counts is None:
        return dy @ w[0] if need_dx else None, (dy.t() @ x)[None] if need_dw else None
    return (grouped_rows_times(dy, w, counts) if need_dx else None,
            grouped_outer(dy, x, counts) if need_dw else None)


def grouped_rows_times(a: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    """a [M, P] with rows sorted by group (counts[e] rows in group e), w [E, P, Q] -> [M, Q]: group e's
    rows times w[e]. For gradients, which need no invariance (`policy.grouped_mm_gradients_kernel`): one
    torch._grouped_mm on CUDA bf16 (no host sync), else one product per group (reading the counts)."""
    if grouped_mm_gradients_kernel(a) == "grouped_mm":
        return torch._grouped_mm(a, w.contiguous(), offs=counts.cumsum(0).to(torch.int32))
    return torch.cat([a_e @ w_e for a_e, w_e in zip(a.split(counts.tolist()), w.unbind())])


def grouped_outer(a: Tensor, b: Tensor, counts: Tensor) -> Tensor:
    """a [M, P], b [M, Q] with rows sorted by group -> [E, P, Q]: a_eᵀ b_e over group e's rows (zeros for
    an empty group). Products as `grouped_rows_times`'."""
    if grouped_mm_gradients_kernel(a) == "grouped_mm":
        return torch._grouped_mm(a.t(), b.contiguous(), offs=counts.cumsum(0).to(torch.int32))
    sizes = counts.tolist()
    return torch.stack([a_e.t() @ b_e for a_e, b_e in zip(a.split(sizes), b.split(sizes))])


def invariant_grouped_mm(x: Tensor, w: Tensor, counts: Tensor | None = None) -> Tensor:
    """x [M, K] with rows sorted by group, `counts[e]` (an int tensor [E] on x's device, summing to M)
    rows in group e; w [E, N, K]. Returns [M, N] in x's dtype: row r of group e is x[r] @ w[e]ᵀ,
    accumulated in fp32 (IEEE for fp32, no TF32). counts=None: one group of all rows (E = 1).
    Differentiable in x and w."""
    if x.dim() != 2 or w.dim() != 3 or w.shape[2] != x.shape[1]:
        raise ValueError(f"x must be [M, K] and w [E, N, K], got {list(x.shape)} and {list(w.shape)}")
    if x.dtype not in KERNEL_DTYPES or w.dtype != x.dtype:
        raise ValueError(f"x and w must share a dtype of fp16, bf16 or fp32, got {x.dtype} and {w.dtype}")
    if counts is None and w.shape[0] != 1:
        raise ValueError(f"without counts w must hold one group, got {w.shape[0]}")
    if counts is not None and (counts.shape != (w.shape[0],) or counts.is_floating_point()
                               or counts.device != x.device):
        raise ValueError(f"counts must be an int tensor [E]=[{w.shape[0]}] on {x.device}, got "
                         f"{list(counts.shape)} {counts.dtype} on {counts.device}")
    return _GroupedMMFunction.apply(x, w, counts) if needs_grad(x, w) else _grouped_mm(x, w, counts)


def invariant_linear(x: Tensor, weight: Tensor) -> Tensor:
    """F.linear without bias over the last dim of x [..., K]; weight [N, K]."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be [N, K], got {list(weight.shape)}")
    out = invariant_grouped_mm(x.reshape(-1, x.shape[-1]), weight[None])
    return out.view(*x.shape[:-1], weight.shape[0])


# -- row sums and softmax --------------------------------------------------------------------------

def row_block(columns: int) -> int:
    """Columns per step of a row's loop: fixed by the row length (so by the call site), never by the
    number of rows."""
    return min(1024, next_power_of_2(columns))


@triton.jit
def _row_sum_kernel(x, out, C, chunk, scale, BLOCK: tl.constexpr):
    """out[i, p] = scale · Σ x[i, c] in fp32 over the columns c of chunk p of row i, x [rows, C]
    contiguous, out [rows, chunks]: BLOCK partial sums over the chunk, reduced once at the end."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    first = part * chunk
    end = tl.minimum(first + chunk, C)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(first, end, BLOCK):
        acc += tl.load(x + row * C + start + cols, mask=start + cols < end, other=0.0).to(tl.float32)
    tl.store(out + row * tl.num_programs(1) + part, (tl.sum(acc, 0) * scale).to(out.dtype.element_ty))


# Rows longer than this are summed in chunks of it, a program each, then the chunks' sums in order:
# one program over a vocabulary's 157K columns would be a serial loop on one SM (~150 µs a row)
ROW_CHUNK = 8192


def _row_sum(x: Tensor, scale: float) -> Tensor:
    x = _aligned(x)
    C = x.shape[-1]
    out = torch.empty(x.shape[:-1], device=x.device, dtype=x.dtype)
    rows = out.numel()
    if not rows:
        return out
    chunks = cdiv(C, ROW_CHUNK)
    if chunks == 1:
        _row_sum_kernel[(rows, 1)](x, out, C, C, scale, BLOCK=row_block(C), num_warps=4)
        return out
    partial = torch.empty(rows, chunks, device=x.device, dtype=torch.float32)
    _row_sum_kernel[(rows, chunks)](x, partial, C, ROW_CHUNK, 1.0, BLOCK=row_block(ROW_CHUNK), num_warps=4)
    _row_sum_kernel[(rows, 1)](partial, out, chunks, chunks, scale, BLOCK=row_block(chunks), num_warps=4)
    return out


class _RowSumFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.shape, ctx.scale = x.shape, scale
        return _row_sum(x, scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (grad * ctx.scale)[..., None].expand(ctx.shape), None


def row_sum(x: Tensor, mean: bool = False) -> Tensor:
    """Sum (or mean) over the last dim of x [..., C] in fp32, returned in x's dtype as [...]."""
    if x.dim() == 0 or x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"row_sum takes an fp16, bf16 or fp32 tensor of at least one dim, got {x.dtype} "
                         f"{list(x.shape)}")
    C = x.shape[-1]
    if C == 0:
        return x.new_full(x.shape[:-1], float("nan") if mean else 0.0)
    scale = 1.0 / C if mean else 1.0
    return _RowSumFunction.apply(x, scale) if needs_grad(x) else _row_sum(x, scale)


# -- RMSNorm ----------------------------------------------------------------------------------------

@triton.jit
def _rms_norm_kernel(x, weight, gate, out, C, G, eps, BLOCK: tl.constexpr, HAS_GATE: tl.constexpr):
    """Row i of x [rows · G, C] (group i % G of a token): its sum of squares in fp32, summed as
    `_row_sum_kernel` sums, then weight · (x / rms rounded to x's dtype), times sigmoid(gate) rounded
    likewise: the roundings of `layers.rms_norm`, in one read of the row for the statistics and one
    for the output."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, C, BLOCK):
        v = tl.load(x + row * C + start + cols, mask=start + cols < C, other=0.0).to(tl.float32)
        acc += v * v
    scale = 1.0 / tl.sqrt(tl.sum(acc, 0) / C + eps)
    dtype = out.dtype.element_ty
    w_offset = (row % G) * C
    for start in range(0, C, BLOCK):
        mask = start + cols < C
        v = tl.load(x + row * C + start + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(weight + w_offset + start + cols, mask=mask, other=0.0).to(tl.float32)
        y = (w * (v * scale).to(dtype).to(tl.float32)).to(dtype)
        if HAS_GATE:
            g = tl.load(gate + row * C + start + cols, mask=mask, other=0.0).to(tl.float32)
            y = (y.to(tl.float32) * (1.0 / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)).to(dtype)
        tl.store(out + row * C + start + cols, y, mask=mask)


def _rms_norm(x: Tensor, weight: Tensor, gate: Tensor | None, eps: float, groups: int) -> Tensor:
    """The launch; x and gate 16-byte aligned and contiguous (`_aligned`)."""
    out = torch.empty_like(x)
    C = x.shape[-1] // groups
    if x.numel():
        _rms_norm_kernel[(x.numel() // C,)](x, weight.contiguous(), x if gate is None else gate, out, C, groups, eps,
                                            BLOCK=row_block(C), HAS_GATE=gate is not None, num_warps=4)
    return out


class _RMSNormFunction(torch.autograd.Function):
    """The kernel forward; the backward is PyTorch's through `reference` (outside numerics)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, gate: Tensor | None, eps: float, groups: int, reference) -> Tensor:
        ctx.save_for_backward(x, weight, gate)
        ctx.eps, ctx.groups, ctx.reference = eps, groups, reference
        return _rms_norm(x, weight, gate, eps, groups)

    @staticmethod
    def backward(ctx, grad: Tensor):
        inputs = [None if t is None else t.detach().requires_grad_() for t in ctx.saved_tensors]  # x, weight, gate
        with torch.enable_grad():
            y = ctx.reference(inputs[0], inputs[1], ctx.eps, ctx.groups, inputs[2])
            grads = iter(torch.autograd.grad(y, [t for t in inputs if t is not None], grad))
        return *(None if t is None else next(grads) for t in inputs), None, None, None


def rms_norm(x: Tensor, weight: Tensor, eps: float, groups: int, gate: Tensor | None, reference) -> Tensor:
    """`layers.rms_norm` in one kernel, a row per program (so a token's bits never depend on the other
    rows); `reference` is that function, whose autograd gives the backward."""
    if x.shape[-1] % groups or weight.shape != (x.shape[-1],) or (gate is not None and gate.shape != x.shape):
        raise ValueError(f"rms_norm: x {list(x.shape)} in {groups} groups, weight {list(weight.shape)}, "
                         f"gate {None if gate is None else list(gate.shape)}")
    x, gate = _aligned(x), None if gate is None else _aligned(gate)
    if needs_grad(x, weight, gate):
        return _RMSNormFunction.apply(x, weight, gate, eps, groups, reference)
    return _rms_norm(x, weight, gate, eps, groups)


@triton.jit
def _softmax_stats_kernel(x, stats, C, chunk, BLOCK: tl.constexpr):
    """Chunk p of row i of x [rows, C]: its max m and Σ exp(x - m) in fp32, into stats [rows, chunks, 2]
    (a chunk of -inf only: m = -inf, sum 0)."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    first = part * chunk
    end = tl.minimum(first + chunk, C)
    peak = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(first, end, BLOCK):
        v = tl.load(x + row * C + start + cols, mask=start + cols < end, other=float("-inf")).to(tl.float32)
        peak = tl.maximum(peak, v)
    top = tl.max(peak, 0)
    shift = tl.where(top == float("-inf"), 0.0, top)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(first, end, BLOCK):
        v = tl.load(x + row * C + start + cols, mask=start + cols < end, other=float("-inf")).to(tl.float32)
        acc += tl.exp(v - shift)
    at = stats + (row * tl.num_programs(1) + part) * 2
    tl.store(at, top)
    tl.store(at + 1, tl.sum(acc, 0))


@triton.jit
def _softmax_write_kernel(x, stats, out, C, chunk, chunks, LOG: tl.constexpr, BLOCK: tl.constexpr,
                          CHUNKS: tl.constexpr):
    """Chunk p of row i of out: softmax (or LOG: log_softmax) of x from the row's chunk statistics,
    which every program of the row combines alike (max, then Σ sum · exp(m - max) in a fixed order)."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    parts = tl.arange(0, CHUNKS)
    at = stats + (row * chunks + parts) * 2
    peaks = tl.load(at, mask=parts < chunks, other=float("-inf"))
    sums = tl.load(at + 1, mask=parts < chunks, other=0.0)
    top = tl.max(peaks, 0)
    shift = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(tl.where(peaks == float("-inf"), 0.0, sums * tl.exp(peaks - shift)), 0)
    log_total = tl.log(total)
    cols = tl.arange(0, BLOCK)
    first = part * chunk
    end = tl.minimum(first + chunk, C)
    for start in range(first, end, BLOCK):
        mask = start + cols < end
        v = tl.load(x + row * C + start + cols, mask=mask, other=0.0).to(tl.float32) - shift
        y = v - log_total if LOG else tl.exp(v) / total
        tl.store(out + row * C + start + cols, y.to(out.dtype.element_ty), mask=mask)


def _softmax(x: Tensor, log: bool) -> Tensor:
    """The two launches."""
    x = _aligned(x)
    C = x.shape[-1]
    out = torch.empty_like(x)
    rows = x.numel() // C if C else 0
    if rows:
        chunks = cdiv(C, ROW_CHUNK)
        chunk = C if chunks == 1 else ROW_CHUNK
        stats = torch.empty(rows, chunks, 2, device=x.device, dtype=torch.float32)
        block = row_block(chunk)
        _softmax_stats_kernel[(rows, chunks)](x, stats, C, chunk, BLOCK=block, num_warps=4)
        _softmax_write_kernel[(rows, chunks)](x, stats, out, C, chunk, chunks, LOG=log, BLOCK=block,
                                              CHUNKS=next_power_of_2(chunks), num_warps=4)
    return out


class _SoftmaxFunction(torch.autograd.Function):
    """The kernels forward; the backward is the ordinary formula (no invariance needed)."""

    @staticmethod
    def forward(ctx, x: Tensor, log: bool) -> Tensor:
        out = _softmax(x, log)
        ctx.save_for_backward(out)
        ctx.log = log
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        y, = ctx.saved_tensors
        p, g = y.float(), grad.float()
        dx = g - p.exp() * g.sum(-1, keepdim=True) if ctx.log else p * (g - (g * p).sum(-1, keepdim=True))
        return dx.to(y.dtype), None


def softmax(x: Tensor, log: bool = False, dtype: torch.dtype | None = None) -> Tensor:
    """softmax (or log_softmax) over the last dim, computed in fp32 and returned in `dtype` (x is cast to it
    first, as torch does) or x's dtype: two launches, the statistics of each row's chunks of `ROW_CHUNK`
    columns, then the output from them (a function of the row length only). Differentiable."""
    if dtype is not None:
        x = x.to(dtype)
    if x.dim() == 0 or x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"softmax takes an fp16, bf16 or fp32 tensor of at least one dim, got {x.dtype} "
                         f"{list(x.shape)}")
    return _SoftmaxFunction.apply(x, log) if needs_grad(x) else _softmax(x, log)


# -- attention over key blocks ---------------------------------------------------------------------

@dataclass(frozen=True)
class AttentionConfig:
    block_m: int  # rows of a tile: queries × the G query heads of a KV head
    num_warps: int
    num_stages: int


def attention_config(dtype: torch.dtype) -> AttentionConfig:
    """The one tile of a dtype, whatever the number of queries (a decode step pads its tile with masked
    rows). The key block is KEY_BLOCK. fp32 runs IEEE products on CUDA cores with twice the bytes of a
    key block: one stage."""
    if dtype == torch.float32:
        return AttentionConfig(block_m=64, num_warps=4, num_stages=1)
    return AttentionConfig(block_m=64, num_warps=4, num_stages=2)


@triton.jit(do_not_specialize=["page_size", "stride_table"])
def _key_block_attention_kernel(q, k, v, o, page_table, key_offset, seq_lens, query_start, tile_seq, tile_first,
                                qk_scale, page_size, stride_table, H: tl.constexpr, G: tl.constexpr,
                                D: tl.constexpr, KB: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    """Program (i, g): tile i (up to BLOCK_M // G queries of one sequence, from row tile_first[i] of q)
    with the G query heads of KV head g folded into its rows (row r: query r // G, head r % G).
    q, o [T, H, D], k, v [P, page_size, KV, D], all contiguous. Key x of sequence n is row
    key_offset[n] + page_table[n, x // page_size] · page_size + x % page_size of k and v viewed as
    [P · page_size, KV, D].

    Why a row's bits are those of its query alone: the blocks are the same absolute keys in the same
    order in every call; an MMA's row depends only on that row's operands, and the row reductions
    (max, sum) reduce each row alike wherever it sits in the tile; a block wholly past a row (the
    tile's later queries need it) leaves its state as it was: p = exp2(-inf) = 0 exactly, m stays
    (finite from block 0 on, which always holds key 0), alpha = exp2(0) = 1, acc · 1 + 0 = acc."""
    KV: tl.constexpr = H // G
    QUERIES: tl.constexpr = BLOCK_M // G
    tile = tl.num_programs(0) - 1 - tl.program_id(0)  # a sequence's last tiles (the most blocks) first: less tail
    g = tl.program_id(1)
    n = tl.load(tile_seq + tile).to(tl.int64)
    first = tl.load(tile_first + tile).to(tl.int64)
    end = tl.load(query_start + n + 1).to(tl.int64)
    if first >= end:  # past the last tile: the grid is an upper bound
        return
    seq_len = tl.load(seq_lens + n).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    query = first + rows // G
    row_ok = (rows < QUERIES * G) & (query < end)
    pos = tl.where(row_ok, seq_len - end + query, -1)  # the new queries are the sequence's last ones
    dims = tl.arange(0, D)
    p_q = (query * H + g * G + rows % G)[:, None] * D + dims[None, :]
    bq = tl.load(q + p_q, mask=row_ok[:, None], other=0.0)
    table = page_table + n * stride_table
    base = tl.load(key_offset + n).to(tl.int64)
    keys = tl.arange(0, KB)
    # finite: a fully masked block then leaves m as it is, with no -inf - (-inf)
    m = tl.full([BLOCK_M], -1.0e38, dtype=tl.float32)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    last = seq_len - end + tl.minimum(first + QUERIES, end) - 1  # the tile's last query
    for j in range(0, last // KB + 1):
        x = j * KB + keys
        present = x < seq_len  # keys past the sequence are not read: a page may hold anything there
        page = tl.load(table + x // page_size, mask=present, other=0).to(tl.int64)
        p_k = ((base + page * page_size + x % page_size) * KV + g)[:, None] * D + dims[None, :]
        bk = tl.load(k + p_k, mask=present[:, None], other=0.0)
        bv = tl.load(v + p_k, mask=present[:, None], other=0.0)
        scores = tl.dot(bq, tl.trans(bk), input_precision=PRECISION) * qk_scale  # [BLOCK_M, KB], log2 units
        scores = tl.where(x[None, :] <= pos[:, None], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        p = tl.exp2(scores - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        total = total * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(bv.dtype), bv, acc * alpha[:, None], input_precision=PRECISION)
        m = m_new
    total = tl.where(row_ok, total, 1.0)  # padding rows saw no key: no 0 / 0
    tl.store(o + p_q, (acc / total[:, None]).to(o.dtype.element_ty), mask=row_ok[:, None])


def key_block_attention(q: Tensor, k_pages: Tensor, v_pages: Tensor, page_table: Tensor, key_offset: Tensor,
                        seq_lens: Tensor, query_start: Tensor, scale: float,
                        config: AttentionConfig | None = None) -> Tensor:
    """`attention.attention_by_key_blocks` (same arguments and result) in one launch; forward only.
    `config`: the dtype's tile unless given (benchmarks/check_invariant.py --attention-tiles times
    candidates)."""
    T, H, D = q.shape
    N = seq_lens.shape[0]
    KV = k_pages.shape[2]
    if D & (D - 1) or D < 16:
        raise ValueError(f"the key-block attention kernel takes head dims of a power of two >= 16, got {D}")
    if q.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the key-block attention kernel takes fp16, bf16 or fp32, got {q.dtype}")
    c = config or attention_config(q.dtype)
    G = H // KV
    if G > c.block_m:
        raise ValueError(f"the key-block attention kernel takes at most {c.block_m} query heads a KV head, got {G}")
    q, k_pages, v_pages = (_aligned(x) for x in (q, k_pages, v_pages))
    # int32 whoever calls (the engine's tables are int32, training's int64): one binary for all calls
    page_table, key_offset, seq_lens, query_start = (
        _aligned(x.to(torch.int32)) for x in (page_table, key_offset, seq_lens, query_start))
    o = torch.empty_like(q)
    if T == 0:
        return o
    # the tiles: each sequence's queries cut from its first one on, BLOCK_M // G at a time. Σ ceil(t_n / Q)
    # ≤ (T + N (Q - 1)) / Q: a grid from the shapes alone, the tiles listed on the device (no host sync);
    # the tiles past the real ones go to a last, empty "sequence" N: they start at row T or later and return
    per_tile = c.block_m // G
    bound = (T + N * (per_tile - 1)) // per_tile
    tiles = (query_start[1:] - query_start[:-1]).long().add(per_tile - 1) // per_tile
    tiles = torch.cat([tiles, bound - tiles.sum().reshape(1)])
    tile_seq = torch.repeat_interleave(torch.arange(N + 1, device=q.device), tiles, output_size=bound)
    first_tile = tiles.cumsum(0) - tiles
    tile_first = query_start.long()[tile_seq] + (torch.arange(bound, device=q.device) - first_tile[tile_seq]) * per_tile
    _key_block_attention_kernel[(bound, KV)](
        q, k_pages, v_pages, o, page_table, key_offset, seq_lens, query_start, tile_seq.clamp_max(N - 1), tile_first,
        float(scale) * 1.4426950408889634, k_pages.shape[1], page_table.stride(0), H=H, G=G, D=D, KB=KEY_BLOCK,
        BLOCK_M=c.block_m, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=c.num_warps, num_stages=c.num_stages)
    return o
