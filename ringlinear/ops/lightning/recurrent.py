"""Lightning attention token by token in Triton: the batch-invariant form of training, prefill and
decode on the GPU (what `naive.lightning_attn_recurrent` is on the CPU).

    S_t = λ S_{t-1} + k_tᵀ v_t,        o_t = (scale · q_t) S_t        (S: fp32 [D, D] per head)

One program per (sequence, head, D_v tile of BV columns) carries its fp32 state [D, BV] in registers
through the sequence, one token per step; the state comes from zero, an initial-state tensor, or a
pool at `slots`, and goes back to a final-state tensor or in place to the pool.

Why a token gets the same bits in every call (a whole sequence, [B, T] padded or packed with others,
a prefill chunk then decode steps): its arithmetic is one pass of the loop body, whose inputs are the
token's q, k, v and the fp32 state the previous token left (in registers, or stored and reloaded
from the pool between calls: the same fp32 either way). Nothing in the body depends on T, on the
number or the content of the other sequences, or on where the token sits in the call. The order in
which `tl.sum` reduces q·S over D follows the tile's layout, so the tile (BV, num_warps) is a function
of D alone, and every argument that could make Triton compile another variant (lengths, flags,
strides, pointers that may be views at any offset) is left unspecialised: one binary per
(H, D, dtype) serves every call.

Cost: T dependent steps per program, each a [D, BV] update and a reduction over D; no tensor cores
and no parallelism along T (the chunked kernel has both), so it is latency-bound: on an H100 (bf16,
B = 8, H = 16, D = 128) 0.7 ms at T = 1K and 2.8 ms at T = 4K, about 10x the chunked forward and
over 400x faster than the PyTorch recurrent form (benchmarks/check_recurrent.py). Bandwidth is not
what limits it: q, k, v are read once and o written once, the next token's loads in flight during
the current step; a decode step costs one read and one write of the state, like `decode.py`.
The gradients need no invariance: the backward is the chunked kernels'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..launch import needs_grad
from .chunk import LightningAttnFunction, default_config, kernel_inputs


@dataclass(frozen=True)
class RecurrentConfig:
    block_v: int    # D_v columns of one program (its state: [D, block_v] fp32)
    num_warps: int


def recurrent_config(head_dim: int) -> RecurrentConfig:
    """The tile for head dim D: 64 fp32 of state per thread, in one warp up to D = 128 (no barrier in
    the reduction; on an H100 at D = 128 the best of 12 tiles at B8×T1K and B64×T256, 13% behind the
    best at B1×T4K). It fixes the reduction order of o = q·S, so it depends on D only, never on T or the
    batch: another tile gives other bits."""
    block_v = max(16, 2048 // head_dim)
    return RecurrentConfig(block_v=block_v, num_warps=max(1, head_dim * block_v // 2048))


@triton.jit(do_not_specialize=["T", "stride_state", "has_h0", "store_ht", "has_slots", "varlen"],
            do_not_specialize_on_alignment=["q", "k", "v", "slots", "cu_seqlens"])
def _recurrent_kernel(q, k, v, o, h0, ht, slots, cu_seqlens, log_decay, scale, T, stride_state,
                      has_h0, store_ht, has_slots, varlen,
                      H: tl.constexpr, D: tl.constexpr, BV: tl.constexpr):
    """q, k, v, o: [tokens, H, D]. Sequence n is tokens cu_seqlens[n]:cu_seqlens[n+1] (varlen) or
    n·T:(n+1)·T; its state is row slots[n] (has_slots) or n of h0 (read if has_h0) and of ht
    (written if store_ht), rows `stride_state` elements apart. Flags are runtime ints, not
    constexprs, so that every call runs the same binary."""
    NV: tl.constexpr = D // BV
    pid = tl.program_id(0)
    i_v = pid % NV
    i_nh = pid // NV
    i_n = i_nh // H
    i_h = i_nh % H
    if varlen != 0:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        length = (tl.load(cu_seqlens + i_n + 1) - bos).to(tl.int32)
    else:
        bos = i_n.to(tl.int64) * T
        length = T
    if has_slots != 0:
        slot = tl.load(slots + i_n).to(tl.int64)
    else:
        slot = i_n.to(tl.int64)
    rows = tl.arange(0, D)
    cols = i_v * BV + tl.arange(0, BV)
    state_offs = slot * stride_state + i_h * D * D + rows[:, None] * D + cols[None, :]
    S = tl.zeros([D, BV], dtype=tl.float32)
    if has_h0 != 0:
        S = tl.load(h0 + state_offs)
    decay = tl.exp(tl.load(log_decay + i_h).to(tl.float32))

    p = (bos * H + i_h) * D  # element offset of the current token's head i_h
    live = length > 0
    nq = tl.load(q + p + rows, mask=(rows < D) & live, other=0.0)
    nk = tl.load(k + p + rows, mask=(rows < D) & live, other=0.0)
    nv = tl.load(v + p + cols, mask=(cols < D) & live, other=0.0)
    for t in range(0, length):
        bq = nq.to(tl.float32) * scale
        bk = nk.to(tl.float32)
        bv = nv.to(tl.float32)
        # the next token's loads go out before this step's arithmetic, which then hides their latency
        nxt = p + H * D
        more = t + 1 < length
        nq = tl.load(q + nxt + rows, mask=(rows < D) & more, other=0.0)
        nk = tl.load(k + nxt + rows, mask=(rows < D) & more, other=0.0)
        nv = tl.load(v + nxt + cols, mask=(cols < D) & more, other=0.0)
        S = S * decay + bk[:, None] * bv[None, :]
        tl.store(o + p + cols, tl.sum(bq[:, None] * S, axis=0).to(o.dtype.element_ty))
        p = nxt
    if store_ht != 0:
        tl.store(ht + state_offs, S)


def _run(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, scale: float, num_seqs: int, T: int,
         cu_seqlens: Tensor | None, h0: Tensor | None, ht: Tensor | None, slots: Tensor | None) -> Tensor:
    """Launch over contiguous [tokens, H, D] inputs; returns o. h0 and ht share one row stride (they
    are one pool, or two [N, H, D, D] tensors)."""
    _, H, D = q.shape
    config = recurrent_config(D)
    o = torch.empty_like(q)
    # absent tensors: empty stand-ins of the dtypes of present ones, so that the signature is the same
    none_f32 = torch.empty(0, device=q.device, dtype=torch.float32)
    none_i64 = torch.empty(0, device=q.device, dtype=torch.int64)
    state = h0 if h0 is not None else ht
    _recurrent_kernel[(num_seqs * H * (D // config.block_v),)](
        q, k, v, o, none_f32 if h0 is None else h0, none_f32 if ht is None else ht,
        none_i64 if slots is None else slots.to(torch.int64),
        none_i64 if cu_seqlens is None else cu_seqlens.to(torch.int64),
        log_decay, scale, T, 0 if state is None else state.stride(0), int(h0 is not None), int(ht is not None),
        int(slots is not None), int(cu_seqlens is not None),
        H=H, D=D, BV=config.block_v, num_warps=config.num_warps, num_stages=1)
    return o


def _forward(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, scale: float, initial_state: Tensor | None,
             output_final_state: bool, cu_seqlens: Tensor | None) -> tuple[Tensor, Tensor | None]:
    B, T, H, D = q.shape
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    ht = torch.empty(N, H, D, D, device=q.device, dtype=torch.float32) if output_final_state else None
    flat = [x.view(B * T, H, D) for x in (q, k, v)]
    o = _run(*flat, log_decay, scale, N, T, cu_seqlens, initial_state, ht, None)
    return o.view(B, T, H, D), ht


class RecurrentLightningFunction(LightningAttnFunction):
    """The recurrent forward; the backward is `LightningAttnFunction`'s (chunked, with `config`)."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens, max_seqlen, config,
                seg_len):
        ctx.save_for_backward(q, k, v, log_decay, initial_state, cu_seqlens)
        ctx.scale, ctx.max_seqlen, ctx.config, ctx.seg_len = scale, max_seqlen, config, seg_len
        return _forward(q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens)


def lightning_attn_recurrent_triton(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, scale: float | None,
                                    initial_state: Tensor | None, output_final_state: bool,
                                    cu_seqlens: Tensor | None, max_seqlen: int | None
                                    ) -> tuple[Tensor, Tensor | None]:
    """Batch-invariant Triton backend of `lightning_attn` (inputs validated by the dispatcher);
    `max_seqlen` plans the backward's segments as in `chunk.lightning_attn_triton`."""
    grad = needs_grad(q, k, v, initial_state)
    q, k, v, log_decay, scale, initial_state, cu_seqlens = kernel_inputs(q, k, v, log_decay, scale,
                                                                         initial_state, cu_seqlens)
    if not grad:
        return _forward(q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens)
    max_seqlen = q.shape[1] if max_seqlen is None else max_seqlen
    return RecurrentLightningFunction.apply(q, k, v, log_decay, scale, initial_state, output_final_state,
                                            cu_seqlens, max_seqlen, default_config(q.shape[-1], q.dtype), None)


def lightning_decode_recurrent_triton(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, state: Tensor,
                                      slots: Tensor, scale: float | None = None) -> Tensor:
    """Batch-invariant Triton backend of `lightning_decode`: one token for each of N sequences
    (q, k, v [N, H, D]) through the same kernel as whole sequences; `state[slots]` updated in place."""
    N, H, D = q.shape
    if state.dtype != torch.float32 or state.stride()[1:] != (D * D, D, 1):
        raise ValueError("the Triton decode takes an fp32 state pool, contiguous within each slot")
    q, k, v, log_decay, scale, _, _ = kernel_inputs(q, k, v, log_decay, scale, None, None)
    return _run(q, k, v, log_decay, scale, N, 1, None, state, state, slots)
