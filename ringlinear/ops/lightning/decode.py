"""Lightning attention decode step in Triton: one token for each of N sequences.

    S ← λ S + kᵀ v,    o = scale · q S        (S: fp32 [D, D] in a pool, updated in place)

Memory-bound: each program reads its [D, BV] slice of one state once and writes it once. D_v is split
across programs (BV columns each) so that even N = 1 spreads over the GPU. No host synchronisation and
nothing allocated but the output, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _decode_kernel(q, k, v, o, state, slots, log_decay, scale,
                   stride_qn, stride_kn, stride_vn, stride_sn,
                   H: tl.constexpr, D: tl.constexpr, BV: tl.constexpr):
    NV: tl.constexpr = D // BV
    pid = tl.program_id(0)  # the D_v tiles of one state are neighbours: one contiguous DRAM region
    i_nh = pid // NV
    i_v = pid % NV
    i_n = i_nh // H
    i_h = i_nh % H
    slot = tl.load(slots + i_n).to(tl.int64)
    rows = tl.arange(0, D)
    cols = i_v * BV + tl.arange(0, BV)
    p_s = state + slot * stride_sn + i_h * D * D + rows[:, None] * D + cols[None, :]
    S = tl.load(p_s, eviction_policy="evict_first")
    bq = tl.load(q + i_n * stride_qn + i_h * D + rows).to(tl.float32) * scale
    bk = tl.load(k + i_n * stride_kn + i_h * D + rows).to(tl.float32)
    bv = tl.load(v + i_n * stride_vn + i_h * D + cols).to(tl.float32)
    S = S * tl.exp(tl.load(log_decay + i_h).to(tl.float32)) + bk[:, None] * bv[None, :]
    tl.store(p_s, S, eviction_policy="evict_first")
    tl.store(o + i_nh * D + cols, tl.sum(bq[:, None] * S, axis=0).to(o.dtype.element_ty))


def decode_block_v(num_rows: int, head_dim: int, num_sms: int) -> int:
    """Columns per program: 64 (32 KB of state) unless that leaves fewer than ~4 programs per SM."""
    block_v = 64
    while block_v > 8 and num_rows * (head_dim // block_v) < 4 * num_sms:
        block_v //= 2
    return min(block_v, head_dim)


def lightning_decode_triton(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, state: Tensor, slots: Tensor,
                            scale: float | None = None, *, out: Tensor | None = None,
                            block_v: int | None = None) -> Tensor:
    """Triton backend of `lightning_decode` (inputs validated by the dispatcher). q, k, v: [N, H, D]
    with unit stride over (H, D); state: the fp32 pool [S, H, D, D], contiguous per slot."""
    N, H, D = q.shape
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.stride(2) != 1 or x.stride(1) != D:
            raise ValueError(f"{name} must be contiguous over (H, D), got strides {x.stride()}")
    if state.dtype != torch.float32 or state.stride()[1:] != (D * D, D, 1):
        raise ValueError("the Triton decode takes an fp32 state pool, contiguous within each slot")
    scale = D**-0.5 if scale is None else float(scale)
    if out is None:
        out = torch.empty(N, H, D, device=q.device, dtype=q.dtype)
    if block_v is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 132
        block_v = decode_block_v(N * H, D, sms)
    tile = D * block_v
    _decode_kernel[(N * H * (D // block_v),)](
        q, k, v, out, state, slots, log_decay, scale, q.stride(0), k.stride(0), v.stride(0), state.stride(0),
        H=H, D=D, BV=block_v, num_warps=8 if tile >= 16384 else 4 if tile >= 4096 else 2)
    return out
