"""Triton kernels of batch-invariant mode on CUDA: a row's numbers are computed by one instruction
sequence whatever the other rows are, in one launch (the PyTorch form, `batch_invariant._in_blocks`,
gets there with a Python loop over fixed-shape blocks).

- `invariant_grouped_mm`: rows sorted by group, row r of group e times w[e]ᵀ (E = 1: F.linear). No
  autotuning and no split of K: an output element is one program's loop over K in order, each step a
  `tl.dot` whose per-element arithmetic does not depend on the other rows of the tile (zeros, or rows
  of other tokens); the tile changes with the rows only where that is measured to keep the bits
  (`mm_config`).
- `row_sum` (and `softmax` from it): one program per row, a fixed block over the columns; torch's
  own reductions split a row over more threads when there are few rows.
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

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .batch_invariant import KEY_BLOCK
from .policy import KERNEL_DTYPES, grouped_mm_gradients_kernel


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


def mm_config(dtype: torch.dtype, rows: int = 0, device: torch.device | None = None) -> MMConfig:
    """The tile of a product of `rows` rows. fp32 runs IEEE products on CUDA cores, not tensor cores, with
    twice the bytes per element: one smaller tile. 16-bit inputs on Hopper's tensor cores: a row's bits
    depend on the order of K alone, not on the tile's rows or columns (every candidate of `check_invariant.py
    --tiles` gave the same bits, H200, 2026-12-02), so many rows take a larger tile; anywhere else (the
    interpreter's numpy products, other GPUs) one tile, since another could give other bits."""
    if dtype == torch.float32:
        return MMConfig(block_m=64, block_n=64, block_k=32, num_warps=4, num_stages=3)
    if rows >= LARGE_TILE_ROWS and device is not None and device.type == "cuda" \
            and torch.cuda.get_device_capability(device) == (9, 0):
        return MMConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)
    return MMConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4)


@triton.jit(do_not_specialize=["M"])
def _grouped_mm_kernel(x, w, out, counts, M, N, K, E, stride_we, stride_wn, stride_wk,
                       GROUPED: tl.constexpr, E_P2: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[r] = x[r] @ w[e]ᵀ for the rows r of group e; x [M, K] and out [M, N] contiguous, w [E, N, K]
    strided. Program (i, j): the i-th row tile over all groups (each group starts a new tile), the
    j-th tile of N. Without GROUPED there is one group of all M rows."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if GROUPED:
        # each program finds its group from the counts alone: no host sync, nothing prepared by torch
        groups = tl.arange(0, E_P2)
        sizes = tl.load(counts + groups, mask=groups < E, other=0).to(tl.int64)
        tiles = (sizes + BLOCK_M - 1) // BLOCK_M
        tile_end = tl.cumsum(tiles, 0)
        group = tl.sum((tile_end <= pid_m).to(tl.int32), 0)  # groups wholly before this tile
        if group >= E:  # past the last tile: the grid is an upper bound
            return
        mine = groups == group
        row_end = tl.sum(tl.where(mine, tl.cumsum(sizes, 0), 0), 0)
        first_tile = tl.sum(tl.where(mine, tile_end - tiles, 0), 0)
        row_start = row_end - tl.sum(tl.where(mine, sizes, 0), 0) + (pid_m - first_tile) * BLOCK_M
        w += group.to(tl.int64) * stride_we
    else:
        row_end = M
        row_start = pid_m.to(tl.int64) * BLOCK_M
    rows = row_start + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < row_end
    col_ok = cols < N
    p_x = x + rows[:, None] * K + ks[None, :]
    p_w = w + cols[None, :] * stride_wn + ks[:, None] * stride_wk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(p_x, mask=row_ok[:, None] & (ks[None, :] < K - k0), other=0.0)
        b = tl.load(p_w, mask=(ks[:, None] < K - k0) & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        p_x += BLOCK_K
        p_w += BLOCK_K * stride_wk
    tl.store(out + rows[:, None] * N + cols[None, :], acc.to(out.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _grouped_mm(x: Tensor, w: Tensor, counts: Tensor | None, config: MMConfig | None = None) -> Tensor:
    """The launch: x [M, K], w [E, N, K] any strides; counts on x's device. `config`: the dtype's tile
    unless given (benchmarks/check_invariant.py --tiles times candidates)."""
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
    grid = ((M + groups * (c.block_m - 1)) // c.block_m, triton.cdiv(N, c.block_n))
    _grouped_mm_kernel[grid](
        x, w, out, x if counts is None else counts, M, N, K, E, w.stride(0), w.stride(1), w.stride(2),
        GROUPED=counts is not None, E_P2=triton.next_power_of_2(E),
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # tf32 is ignored for 16-bit inputs
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, num_warps=c.num_warps, num_stages=c.num_stages)
    return out


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
    the fast products (`policy.grouped_mm_gradients_kernel`): one matmul each for one group, two
    torch._grouped_mm (no host sync) for CUDA bf16; else this file's kernel for dx and one product per
    group for dw (reading the counts on the host)."""
    if counts is None:
        return dy @ w[0] if need_dx else None, (dy.t() @ x)[None] if need_dw else None
    if grouped_mm_gradients_kernel(dy) == "grouped_mm":
        offsets = counts.cumsum(0).to(torch.int32)  # end row of each group
        w = w.contiguous()
        dx = torch._grouped_mm(dy, w, offs=offsets) if need_dx else None
        dw = torch._grouped_mm(dy.t(), x.contiguous(), offs=offsets) if need_dw else None
        return dx, dw
    dx = _grouped_mm(dy, w.transpose(1, 2), counts) if need_dx else None
    dw = None
    if need_dw:
        dw = torch.zeros(w.shape, device=w.device, dtype=w.dtype)
        sizes = counts.tolist()
        for e, (dy_e, x_e) in enumerate(zip(dy.split(sizes), x.split(sizes))):
            if x_e.shape[0]:
                dw[e] = dy_e.t() @ x_e
    return dx, dw


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
    return _GroupedMMFunction.apply(x, w, counts)


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
    return min(1024, triton.next_power_of_2(columns))


@triton.jit
def _row_sum_kernel(x, out, C, scale, BLOCK: tl.constexpr):
    """out[i] = scale · Σ_c x[i, c] in fp32, x [rows, C] contiguous: BLOCK partial sums per program,
    reduced once at the end."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, C, BLOCK):
        acc += tl.load(x + row * C + start + cols, mask=start + cols < C, other=0.0).to(tl.float32)
    tl.store(out + row, (tl.sum(acc, 0) * scale).to(out.dtype.element_ty))


def _row_sum(x: Tensor, scale: float) -> Tensor:
    x = _aligned(x)
    C = x.shape[-1]
    out = torch.empty(x.shape[:-1], device=x.device, dtype=x.dtype)
    if out.numel():
        _row_sum_kernel[(out.numel(),)](x, out, C, scale, BLOCK=row_block(C), num_warps=4)
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
    return _RowSumFunction.apply(x, 1.0 / C if mean else 1.0)


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


class _RMSNormFunction(torch.autograd.Function):
    """The kernel forward; the backward is PyTorch's through `reference` (outside numerics)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, gate: Tensor | None, eps: float, groups: int, reference) -> Tensor:
        x, g = _aligned(x), None if gate is None else _aligned(gate)
        out = torch.empty_like(x)
        C = x.shape[-1] // groups
        if x.numel():
            _rms_norm_kernel[(x.numel() // C,)](x, weight.contiguous(), x if g is None else g, out, C, groups, eps,
                                                BLOCK=row_block(C), HAS_GATE=g is not None, num_warps=4)
        ctx.save_for_backward(x, weight, g)
        ctx.eps, ctx.groups, ctx.reference = eps, groups, reference
        return out

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
    return _RMSNormFunction.apply(x, weight, gate, eps, groups, reference)


def softmax(x: Tensor, log: bool = False, dtype: torch.dtype | None = None) -> Tensor:
    """softmax (or log_softmax) over the last dim from exact ops and `row_sum`, in fp32 at least,
    returned in `dtype` (x is cast to it first, as torch does) or x's dtype. Differentiable."""
    if dtype is not None:
        x = x.to(dtype)
    work = x.to(torch.promote_types(x.dtype, torch.float32))
    # the result does not depend on the max (it only keeps exp in range): no gradient through it
    shifted = work - work.amax(-1, keepdim=True).detach()
    e = torch.exp(shifted)
    total = row_sum(e)[..., None]
    return (shifted - torch.log(total) if log else e / total).to(x.dtype)


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
