"""Draft-tree verification for Lightning attention in Triton (the math and layout: `tree_reference.py`,
`ops.tree`).

Verify: one program per (tree, head, D_v tile of BV columns). A tree of m ≤ 64 tokens is one tile of
BT rows, so the whole tree is two tensor-core products and one read of the prefix state:

    A = (q kᵀ) ⊙ [j ⪯ i] λ^(d_i-d_j),        o = scale · (λ^(d_i+1) (q S) + A v)

the ancestor mask coming from each row's bitmask. Nothing is written but o: the drafts leave no trace
in the state. Fold: one program per (sequence, head, D_v tile) carries its [D, BV] slice of the state
through the accepted tokens with a decode step's update, S ← S·λ + kᵀ v, and writes it back once.
Neither kernel synchronises with the host, so a verify step can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..launch import next_power_of_2
from .chunk import _dot_precision
from .decode import decode_block_v


@triton.jit
def _verify_kernel(q, k, v, o, state, slots, ancestors, depth, query_start, log_decay, scale,
                   stride_qt, stride_kt, stride_vt, stride_sn,
                   H: tl.constexpr, D: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, DOT_PREC: tl.constexpr):
    NV: tl.constexpr = D // BV
    pid = tl.program_id(0)
    i_n = tl.program_id(1)
    i_h = pid // NV
    i_v = pid % NV
    bos = tl.load(query_start + i_n).to(tl.int64)
    length = (tl.load(query_start + i_n + 1) - bos).to(tl.int32)
    rows = tl.arange(0, BT)
    valid = rows < length
    cols_k = tl.arange(0, D)
    cols_v = i_v * BV + tl.arange(0, BV)
    t = bos + rows
    bq = tl.load(q + t[:, None] * stride_qt + i_h * D + cols_k[None, :], mask=valid[:, None], other=0.0)
    bk = tl.load(k + t[:, None] * stride_kt + i_h * D + cols_k[None, :], mask=valid[:, None], other=0.0)
    bv = tl.load(v + t[:, None] * stride_vt + i_h * D + cols_v[None, :], mask=valid[:, None], other=0.0)
    bits = tl.load(ancestors + t, mask=valid, other=0)
    d = tl.load(depth + t, mask=valid, other=0).to(tl.float32)
    slot = tl.load(slots + i_n).to(tl.int64)
    S = tl.load(state + slot * stride_sn + i_h * D * D + cols_k[:, None] * D + cols_v[None, :])

    g = tl.load(log_decay + i_h).to(tl.float32)
    sees = ((bits[:, None] >> rows[None, :].to(tl.int64)) & 1) != 0
    decay = tl.where(sees, tl.exp(g * tl.maximum(d[:, None] - d[None, :], 0.0)), 0.0)
    dt = bv.dtype
    A = tl.dot(bq, tl.trans(bk), input_precision=DOT_PREC) * decay
    bo = tl.dot(bq, S.to(dt), input_precision=DOT_PREC) * tl.exp(g * (d + 1))[:, None]
    bo = tl.dot(A.to(dt), bv, bo, input_precision=DOT_PREC) * scale
    tl.store(o + (t[:, None] * H + i_h) * D + cols_v[None, :], bo.to(o.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _fold_kernel(k, v, state, slots, accepted, num_accepted, log_decay, stride_kt, stride_vt, stride_sn,
                 stride_accepted, H: tl.constexpr, D: tl.constexpr, BV: tl.constexpr):
    NV: tl.constexpr = D // BV
    pid = tl.program_id(0)
    i_v = pid % NV
    i_nh = pid // NV
    i_n = i_nh // H
    i_h = i_nh % H
    rows = tl.arange(0, D)
    cols = i_v * BV + tl.arange(0, BV)
    slot = tl.load(slots + i_n).to(tl.int64)
    p_s = state + slot * stride_sn + i_h * D * D + rows[:, None] * D + cols[None, :]
    S = tl.load(p_s)
    decay = tl.exp(tl.load(log_decay + i_h).to(tl.float32))
    for r in range(tl.load(num_accepted + i_n)):
        t = tl.load(accepted + i_n * stride_accepted + r).to(tl.int64)
        bk = tl.load(k + t * stride_kt + i_h * D + rows).to(tl.float32)
        bv = tl.load(v + t * stride_vt + i_h * D + cols).to(tl.float32)
        S = S * decay + bk[:, None] * bv[None, :]
    tl.store(p_s, S)


def _check_rows(D: int, **tensors: Tensor) -> None:
    for name, x in tensors.items():
        if x.stride(2) != 1 or x.stride(1) != D:
            raise ValueError(f"{name} must be contiguous over (H, D), got strides {x.stride()}")


def _check_pool(state: Tensor, D: int) -> None:
    if state.dtype != torch.float32 or state.stride()[1:] != (D * D, D, 1):
        raise ValueError("the Triton tree kernels take an fp32 state pool, contiguous within each slot")


def _block_v(rows: int, D: int, device: torch.device) -> int:
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    return decode_block_v(rows, D, sms)


def lightning_tree_verify_triton(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, state: Tensor,
                                 slots: Tensor, ancestors: Tensor, depth: Tensor, query_start: Tensor,
                                 max_tree_len: int, scale: float | None = None) -> Tensor:
    """Triton backend of `lightning_tree_verify` (inputs validated by the dispatcher)."""
    T, H, D = q.shape
    _check_rows(D, q=q, k=k, v=v)
    _check_pool(state, D)
    N = slots.shape[0]
    # 64 columns whatever N: a tile's q kᵀ is computed once per tile, and narrower tiles that fill the SMs at
    # small N were slower on the H200 (16 trees of 16 tokens: BV 64 13.7 µs, BV 32 15.6, BV 16 17.9)
    block_v = min(64, D)
    o = torch.empty(T, H, D, device=q.device, dtype=q.dtype)
    _verify_kernel[(H * (D // block_v), N)](
        q, k, v, o, state, slots, ancestors, depth, query_start, log_decay, D**-0.5 if scale is None else scale,
        q.stride(0), k.stride(0), v.stride(0), state.stride(0),
        H=H, D=D, BV=block_v, BT=max(16, next_power_of_2(max_tree_len)), DOT_PREC=_dot_precision(q.dtype),
        num_warps=4)
    return o


def lightning_tree_fold_triton(k: Tensor, v: Tensor, log_decay: Tensor, state: Tensor, slots: Tensor,
                               accepted: Tensor, num_accepted: Tensor) -> None:
    """Triton backend of `lightning_tree_fold` (inputs validated by the dispatcher)."""
    _, H, D = k.shape
    _check_rows(D, k=k, v=v)
    _check_pool(state, D)
    if accepted.stride(1) != 1 or num_accepted.stride(0) != 1:
        raise ValueError(f"accepted needs unit stride along its rows and num_accepted unit stride, got "
                         f"{accepted.stride()} and {num_accepted.stride()}")
    N = slots.shape[0]
    block_v = _block_v(N * H, D, k.device)
    _fold_kernel[(N * H * (D // block_v),)](
        k, v, state, slots, accepted, num_accepted, log_decay, k.stride(0), v.stride(0), state.stride(0),
        accepted.stride(0), H=H, D=D, BV=block_v, num_warps=4)
