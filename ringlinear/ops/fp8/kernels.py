"""Triton kernels of blockwise FP8: quantization (1×128, transposed 1×128, 128×128) and the GEMM with
per-128 promotion, plain or grouped by expert. `reference.py` holds what each computes.

One quantize kernel serves the three layouts: it reads a logical matrix X [R, C] through strides
(xᵀ is x with its strides swapped, so the transposed operand of the backward is read, not copied)
and writes contiguous codes with one scale per row and 128 columns, or per 128×128 tile (`SQUARE`).
Divisions are IEEE (`div_rn`) and each value is rounded onto e4m3's grid in fp32 before the cast (an
exact cast then), so the codes equal the reference's bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..launch import cdiv
from ..moe_kernels import BLOCK_M as SCHEDULE_ROWS
from ..moe_kernels import program_tile, schedule_tiles
from .reference import BLOCK, E4M3, E4M3_MAX, blocks

_WEIGHT_BLOCK = tl.constexpr(BLOCK)  # rows of b per scale in the grouped GEMM: weights' 128×128 blocks


@triton.jit
def _round_to_e4m3(q):
    """q (fp32, |q| ≤ 448) rounded to nearest even on e4m3's grid, in fp32 arithmetic: the step of
    binade 2^e is 2^(e-3) (subnormals take the step of the smallest binade, 2^-9), and adding then
    subtracting 2^(e+20), whose fp32 ulp is that step, rounds there. The cast after it is exact, so the
    codes do not depend on how the compiler lowers an fp32 -> e4m3 cast."""
    bits = q.to(tl.int32, bitcast=True)
    a = tl.abs(q)
    exponent = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    magic = ((exponent + 20 + 127) << 23).to(tl.float32, bitcast=True)
    r = (a + magic) - magic
    sign = (bits >> 31) << 31  # the sign bit alone (Triton's -x is 0 - x, which loses the sign of a zero)
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _quantize_kernel(x_ptr, q_ptr, s_ptr, R, C, stride_r, stride_c, s_stride,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SQUARE: tl.constexpr, MAX: tl.constexpr):
    pid_r, pid_c = tl.program_id(0), tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_r + cols[None, :] * stride_c, mask=mask,
                other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    if SQUARE:
        amax = tl.max(amax, axis=0)
    # div_rn does not broadcast: both operands are given the same shape
    scale = tl.math.div_rn(amax, tl.zeros_like(amax) + MAX)
    scale = tl.where(scale > 0, scale, 1.0)
    if SQUARE:
        q = tl.math.div_rn(x, tl.zeros_like(x) + scale)
        tl.store(s_ptr + pid_r * s_stride + pid_c, scale)
    else:
        q = tl.math.div_rn(x, tl.zeros_like(x) + scale[:, None])
        tl.store(s_ptr + rows * s_stride + pid_c, scale, mask=rows < R)
    q = _round_to_e4m3(tl.minimum(tl.maximum(q, -MAX), MAX))
    tl.store(q_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)


def quantize_triton(x: Tensor, square: bool) -> tuple[Tensor, Tensor]:
    """x [R, C] (any strides) -> (codes [R, C] contiguous e4m3, scales): 1×128 blocks, or 128×128 if `square`."""
    R, C = x.shape
    q = torch.empty(R, C, dtype=E4M3, device=x.device)
    scale = torch.empty(blocks(R) if square else R, blocks(C), dtype=torch.float32, device=x.device)
    block_r = BLOCK if square else 32
    grid = (cdiv(R, block_r), blocks(C))
    _quantize_kernel[grid](x, q, scale, R, C, x.stride(0), x.stride(1), scale.stride(0),
                           BLOCK_R=block_r, BLOCK_C=BLOCK, SQUARE=square, MAX=E4M3_MAX, num_warps=4)
    return q, scale


@triton.jit
def _gemm_tile(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, rm, rn, m_ok, n_ok, K, stride_a, stride_b, stride_c, as_stride,
               bs_stride, B_ROWS_PER_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr):
    # c[rm, rn] = a[rm] @ b[rn]ᵀ, a [·, K] and b [·, K] e4m3; each 128-wide slice of K is multiplied on the
    # tensor cores, then scaled and added in fp32 (DeepSeek-V3's promotion every 128 elements of K)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(tl.cdiv(K, BLOCK_K)):
        k = kb * BLOCK_K + rk
        a = tl.load(a_ptr + rm[:, None].to(tl.int64) * stride_a + k[None, :],
                    mask=m_ok[:, None] & (k[None, :] < K), other=0.0)
        b = tl.load(b_ptr + rn[:, None].to(tl.int64) * stride_b + k[None, :],
                    mask=n_ok[:, None] & (k[None, :] < K), other=0.0)
        sa = tl.load(as_ptr + rm * as_stride + kb, mask=m_ok, other=0.0)
        sb = tl.load(bs_ptr + (rn // B_ROWS_PER_SCALE) * bs_stride + kb, mask=n_ok, other=0.0)
        acc += tl.dot(a, tl.trans(b)) * sa[:, None] * sb[None, :]
    tl.store(c_ptr + rm[:, None].to(tl.int64) * stride_c + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K, stride_a, stride_b, stride_c, as_stride, bs_stride,
                 B_ROWS_PER_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    _gemm_tile(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, rm, rn, rm < M, rn < N, K, stride_a, stride_b, stride_c,
               as_stride, bs_stride, B_ROWS_PER_SCALE, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _grouped_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, schedule, T, E, N, K, stride_a, stride_c, as_stride,
                         b_expert_stride, stride_b, bs_expert_stride, bs_stride, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c[r] = a[r] @ b[e]ᵀ for the rows r of expert e, b [E, N, K] with 128×128 scales [E, ·, ·]. Programs:
    `moe_kernels.program_tile` over the schedule of `moe_kernels.schedule_tiles`; the tiles past the last
    return at once."""
    expert, start, end, pid_n = program_tile(schedule, T, N, BLOCK_N)
    if expert >= E:
        return
    rm = start + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    _gemm_tile(a_ptr, as_ptr, b_ptr + expert.to(tl.int64) * b_expert_stride, bs_ptr + expert * bs_expert_stride,
               c_ptr, rm, rn, rm < end, rn < N, K, stride_a, stride_b, stride_c, as_stride, bs_stride, _WEIGHT_BLOCK,
               BLOCK_M, BLOCK_N, BLOCK_K)


def gemm_triton(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """a @ bᵀ: a [M, K] with 1×128 scales, b [N, K] with 1×128 ([N, ·]) or 128×128 ([ceil(N/128), ·]) scales."""
    (M, K), N = a.shape, b.shape[0]
    c = torch.empty(M, N, dtype=out_dtype, device=a.device)
    block_m = 64 if M <= 64 else 128
    grid = (cdiv(M, block_m), cdiv(N, BLOCK))
    _gemm_kernel[grid](a, a_scale, b, b_scale, c, M, N, K, a.stride(0), b.stride(0), c.stride(0),
                       a_scale.stride(0), b_scale.stride(0), B_ROWS_PER_SCALE=1 if b_scale.shape[0] == N else BLOCK,
                       BLOCK_M=block_m, BLOCK_N=BLOCK, BLOCK_K=BLOCK, num_warps=8, num_stages=3)
    return c


def grouped_gemm_triton(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, counts: Tensor,
                        out_dtype: torch.dtype, schedule: Tensor | None = None) -> Tensor:
    """a @ b[e]ᵀ for the rows of each expert e: a [M, K] sorted by expert (counts [E] on the device) with 1×128
    scales, b [E, N, K] with 128×128 scales [E, ceil(N/128), ceil(K/128)]; `schedule`: `schedule_tiles(counts,
    M)` when the caller has it (the experts' three products share one). The grid follows the shapes alone
    (a bound on the row tiles of M rows over E experts), so nothing waits for the host."""
    (M, K), (E, N) = a.shape, b.shape[:2]
    c = torch.empty(M, N, dtype=out_dtype, device=a.device)
    if M == 0:
        return c
    schedule = schedule_tiles(counts, M) if schedule is None else schedule
    T = schedule.shape[1]
    _grouped_gemm_kernel[(T * cdiv(N, BLOCK),)](
        a, a_scale, b, b_scale, c, schedule, T, E, N, K, a.stride(0), c.stride(0), a_scale.stride(0), b.stride(0),
        b.stride(1), b_scale.stride(0), b_scale.stride(1), BLOCK_M=SCHEDULE_ROWS, BLOCK_N=BLOCK, BLOCK_K=BLOCK,
        num_warps=8, num_stages=3)
    return c
