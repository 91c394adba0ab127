"""Chunk-aligned Lightning attention in Triton: the batch-invariant form of training, prefill, decode
and speculative verification on the GPU (what `naive.lightning_aligned_reference` is on the CPU).

Chunks of BT = 64 tokens are cut at absolute positions, multiples of 64 from each sequence's start.
Per (sequence, head) the call starts from S_c, the fp32 state at the start of the sequence's current
chunk c, and the k, v rows of that chunk's tokens seen so far (position % 64 of them, kept by the
caller in a pool of partial chunks beside the state pool). A token at offset i of its chunk gets

    o_i = scale · λ^(i+1) q_i S_c + scale · Σ_{j≤i in chunk} λ^(i-j) (q_i·k_j) v_j

and a completed chunk is folded in: S_{c+1} = λ^64 S_c + Σ_j λ^(63-j) k_jᵀ v_j. One program per
(sequence, head, D_v tile of BV columns) processes its new tokens chunk by chunk, always on a full
64-row tile: the buffered rows, then the new rows, then zero rows (masked loads with other=0, the
causal mask by tl.where, so masked entries are exact zeros), through the same tl.dot sequence as
`chunk.py`'s forward. It writes the new rows' outputs, folds each completed chunk into the state,
and leaves (the state at the last chunk's start, the rows of the last partial chunk) for the next
call, the rows written by a second small launch (`_keep_rows_kernel`: the programs of a sequence's
other D_v tiles may still be reading the rows they replace); or, without a pool of partial chunks
(training), folds the last partial chunk in too and returns the state after the last token.

Why a token gets the same bits however its sequence is split into calls (a whole sequence, packed
with other documents, a prefill chunk of any size starting anywhere, one-token decode steps, a verify
chain): every tile is full-size, so row i of an MMA depends only on row i's operands, and zero rows
add exact zeros; the state at a chunk start and the chunk's k, v rows are the same values whichever
call produced them (the rows are stored in the model dtype, the state in fp32). A completed chunk's
fold reads the same 64 rows in the same tile, so the next state agrees too. Nothing depends on the
number of valid rows, on the other sequences, or on where the token sits in the call. The tile (BV,
warps) is a function of (D, dtype) alone, and every argument that would make Triton compile another
variant (lengths, strides, flags, pointers that may be views at any offset) is left unspecialised:
one binary per (H, D, dtype) serves every call.

Cost: a chunk of new tokens is three 64-row products and a state update, as in the chunked forward,
but with no split of long sequences into parallel segments; a decode step reads the state once and
the partial chunk's rows (half the state's bytes at D = 128 in bf16), and writes the state only when
its token completes a chunk. The gradients need no invariance: the backward is the chunked kernels'.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .chunk import BT, LightningAttnFunction, _dot_precision, default_config, kernel_inputs, needs_grad
from .naive import sequence_bounds

_INTS = ["stride_state", "stride_chunk", "has_q", "has_state", "read_chunk", "keep_chunk", "store_state"]


@triton.jit(do_not_specialize=_INTS,
            do_not_specialize_on_alignment=["q", "k", "v", "o", "state_in", "state_out", "chunk_k", "chunk_v",
                                            "slots", "positions", "starts", "lengths"])
def _aligned_kernel(q, k, v, o, state_in, state_out, chunk_k, chunk_v, slots, positions, starts, lengths,
                    log_decay, scale, stride_state, stride_chunk, has_q, has_state, read_chunk, keep_chunk,
                    store_state,
                    H: tl.constexpr, D: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, DOT_PREC: tl.constexpr):
    """q, k, v, o: [tokens, H, D]; sequence n is tokens starts[n]:starts[n]+lengths[n], its state row
    slots[n] of state_in (read if has_state) and state_out (written if store_state), its partial chunk
    row slots[n] of chunk_k, chunk_v [S, BT, H, D] (positions[n] % BT rows read if read_chunk). The
    last partial chunk is left out of the state if keep_chunk (its rows are `_keep_rows_kernel`'s to
    write), else folded in. has_q = 0: no outputs (a fold). Flags are runtime ints, not constexprs, so
    that every call runs the same binary."""
    NV: tl.constexpr = D // BV
    pid = tl.program_id(0)
    i_v = pid % NV
    i_nh = pid // NV
    i_n = i_nh // H
    i_h = i_nh % H
    bos = tl.load(starts + i_n).to(tl.int64)
    length = tl.load(lengths + i_n).to(tl.int32)
    slot = tl.load(slots + i_n).to(tl.int64)
    offset = (tl.load(positions + i_n, mask=read_chunk != 0, other=0) % BT).to(tl.int32)

    rows = tl.arange(0, BT)
    cols_k = tl.arange(0, D)
    cols_v = i_v * BV + tl.arange(0, BV)
    state_offs = slot * stride_state + i_h * D * D + cols_v[:, None] + cols_k[None, :] * D  # of Sᵀ [BV, D]
    chunk_offs = slot * stride_chunk + (rows * H + i_h) * D  # row r of the slot's partial chunk
    S = tl.zeros([BV, D], dtype=tl.float32)  # Sᵀ, as chunk.py carries it
    if has_state != 0:
        S += tl.load(state_in + state_offs)

    g = tl.load(log_decay + i_h).to(tl.float32)
    dist = rows[:, None] - rows[None, :]
    intra_decay = tl.where(dist >= 0, tl.exp(g * tl.maximum(dist, 0)), 0.0) * scale
    q_decay = tl.exp(g * (rows + 1)) * scale
    end = offset + length  # the new tokens sit at chunk-relative positions offset..end-1
    for c in range(0, end, BT):
        t = c + rows - offset  # each row's token index in this call
        new = (t >= 0) & (t < length)
        buffered = c + rows < offset  # only in the first chunk
        tok = ((bos + t) * H + i_h) * D
        bk = tl.where(buffered[:, None],
                      tl.load(chunk_k + chunk_offs[:, None] + cols_k[None, :], mask=buffered[:, None], other=0.0),
                      tl.load(k + tok[:, None] + cols_k[None, :], mask=new[:, None], other=0.0))
        bv = tl.where(buffered[:, None],
                      tl.load(chunk_v + chunk_offs[:, None] + cols_v[None, :], mask=buffered[:, None], other=0.0),
                      tl.load(v + tok[:, None] + cols_v[None, :], mask=new[:, None], other=0.0))
        dt = bv.dtype
        if has_q != 0:
            bq = tl.load(q + tok[:, None] + cols_k[None, :], mask=new[:, None], other=0.0)
            A = tl.dot(bq, tl.trans(bk), input_precision=DOT_PREC) * intra_decay
            bo = tl.dot(bq, tl.trans(S.to(dt)), input_precision=DOT_PREC) * q_decay[:, None]
            bo = tl.dot(A.to(dt), bv, bo, input_precision=DOT_PREC)
            tl.store(o + tok[:, None] + cols_v[None, :], bo.to(o.dtype.element_ty), mask=new[:, None])
        n = tl.minimum(end - c, BT)  # rows of this chunk so far
        if (n == BT) | (keep_chunk == 0):
            kv_decay = tl.exp(g * tl.maximum(n - 1 - rows, 0))  # of row j's k_jᵀ v_j
            S = tl.dot(tl.trans((bv * kv_decay[:, None]).to(dt)), bk, S * tl.exp(g * n), input_precision=DOT_PREC)
    # in place in a pool, the state changes only when a chunk completes
    if (store_state != 0) & ((end >= BT) | (keep_chunk == 0)):
        tl.store(state_out + state_offs, S)


@triton.jit(do_not_specialize=["stride_chunk"],
            do_not_specialize_on_alignment=["k", "v", "chunk_k", "chunk_v", "slots", "positions", "starts",
                                            "lengths"])
def _keep_rows_kernel(k, v, chunk_k, chunk_v, slots, positions, starts, lengths, stride_chunk,
                      H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr):
    """The new rows of each sequence's last partial chunk into its pool rows, one program per (sequence,
    head). A launch of its own: in the main kernel, the programs of a sequence's other D_v tiles may
    still be reading the rows of its first chunk that these overwrite."""
    i_n = tl.program_id(0)
    i_h = tl.program_id(1)
    bos = tl.load(starts + i_n).to(tl.int64)
    length = tl.load(lengths + i_n).to(tl.int32)
    slot = tl.load(slots + i_n).to(tl.int64)
    offset = (tl.load(positions + i_n) % BT).to(tl.int32)
    end = offset + length
    rows = tl.arange(0, BT)
    cols = tl.arange(0, D)
    t = end // BT * BT + rows - offset  # the last chunk's rows as tokens of this call
    new = ((t >= 0) & (t < length))[:, None]
    tok = ((bos + t) * H + i_h) * D
    pool = slot * stride_chunk + (rows * H + i_h) * D
    tl.store(chunk_k + pool[:, None] + cols[None, :], tl.load(k + tok[:, None] + cols[None, :], mask=new), mask=new)
    tl.store(chunk_v + pool[:, None] + cols[None, :], tl.load(v + tok[:, None] + cols[None, :], mask=new), mask=new)


def aligned_tile(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BV, num_warps): the chunked forward's tile. It fixes the products' layout, so it depends on
    (D, dtype) only, never on the number of sequences or tokens: another tile could give other bits."""
    config = default_config(head_dim, dtype)
    return config.block_v, config.num_warps


def lightning_aligned_triton(q: Tensor | None, k: Tensor, v: Tensor, log_decay: Tensor, scale: float | None,
                             state_in: Tensor | None, state_out: Tensor | None, chunk_k: Tensor | None,
                             chunk_v: Tensor | None, slots: Tensor, positions: Tensor | None, starts: Tensor,
                             lengths: Tensor, out: Tensor | None = None) -> Tensor | None:
    """Triton backend of `lightning_aligned` (inputs validated by the dispatcher): q (None: a fold),
    k, v [tokens, H, D] with unit stride over (H, D); states [S, H, D, D] fp32 and partial chunks
    [S, BT, H, D] in k's dtype, each contiguous within a slot. Returns o (into `out` if given)."""
    _, H, D = k.shape
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x is not None and (x.stride(2) != 1 or x.stride(1) != D):
            raise ValueError(f"{name} must be contiguous over (H, D), got strides {x.stride()}")
    for name, x in (("state_in", state_in), ("state_out", state_out)):
        if x is not None and (x.dtype != torch.float32 or x.stride()[1:] != (D * D, D, 1)):
            raise ValueError(f"{name} must be an fp32 state pool, contiguous within each slot")
    for name, x in (("chunk_k", chunk_k), ("chunk_v", chunk_v)):
        if x is not None and (x.dtype != k.dtype or x.stride()[1:] != (H * D, D, 1)):
            raise ValueError(f"{name} must be a pool [S, {BT}, H, D] of k's dtype, contiguous within each slot")
    scale = D**-0.5 if scale is None else float(scale)
    log_decay = log_decay.to(device=k.device, dtype=torch.float32).contiguous()
    if q is not None and out is None:
        out = torch.empty_like(q)
    if slots.shape[0] == 0:
        return out
    # absent tensors: empty stand-ins of the dtypes of present ones, so that the signature is the same
    none_f32 = torch.empty(0, device=k.device, dtype=torch.float32)
    none_rows = torch.empty(0, device=k.device, dtype=k.dtype)
    state = state_in if state_in is not None else state_out
    block_v, num_warps = aligned_tile(D, k.dtype)
    _aligned_kernel[(slots.shape[0] * H * (D // block_v),)](
        k if q is None else q, k, v, none_rows if out is None else out,
        none_f32 if state_in is None else state_in, none_f32 if state_out is None else state_out,
        none_rows if chunk_k is None else chunk_k, none_rows if chunk_v is None else chunk_v,
        slots, starts if positions is None else positions, starts, lengths, log_decay, scale,
        0 if state is None else state.stride(0), 0 if chunk_k is None else chunk_k.stride(0),
        int(q is not None), int(state_in is not None), int(positions is not None), int(chunk_k is not None),
        int(state_out is not None),
        H=H, D=D, BV=block_v, BT=BT, DOT_PREC=_dot_precision(k.dtype), num_warps=num_warps, num_stages=1)
    if state_out is not None and chunk_k is not None:
        _keep_rows_kernel[(slots.shape[0], H)](k, v, chunk_k, chunk_v, slots, positions, starts, lengths,
                                               chunk_k.stride(0), H=H, D=D, BT=BT, num_warps=4)
    return out


def _forward(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, scale: float, initial_state: Tensor | None,
             output_final_state: bool, cu_seqlens: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Whole sequences from chunk offset 0: the rows of [B, T] or the packed documents of cu_seqlens."""
    B, T, H, D = q.shape
    starts, lengths = sequence_bounds(B, T, cu_seqlens, q.device)
    N = starts.shape[0]
    ht = torch.empty(N, H, D, D, device=q.device, dtype=torch.float32) if output_final_state else None
    flat = [x.view(B * T, H, D) for x in (q, k, v)]
    o = lightning_aligned_triton(*flat, log_decay, scale, initial_state, ht, None, None,
                                 torch.arange(N, device=q.device), None, starts, lengths)
    return o.view(B, T, H, D), ht


class AlignedLightningFunction(LightningAttnFunction):
    """The aligned forward; the backward is `LightningAttnFunction`'s (chunked, with `config`)."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens, max_seqlen, config,
                seg_len):
        ctx.save_for_backward(q, k, v, log_decay, initial_state, cu_seqlens)
        ctx.scale, ctx.max_seqlen, ctx.config, ctx.seg_len = scale, max_seqlen, config, seg_len
        return _forward(q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens)


def lightning_attn_aligned_triton(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, scale: float | None,
                                  initial_state: Tensor | None, output_final_state: bool,
                                  cu_seqlens: Tensor | None, max_seqlen: int | None
                                  ) -> tuple[Tensor, Tensor | None]:
    """Batch-invariant Triton backend of `lightning_attn` (inputs validated by the dispatcher): every
    sequence starts at a chunk boundary; `max_seqlen` plans the backward's segments as in
    `chunk.lightning_attn_triton`."""
    grad = needs_grad(q, k, v, initial_state)
    q, k, v, log_decay, scale, initial_state, cu_seqlens = kernel_inputs(q, k, v, log_decay, scale,
                                                                         initial_state, cu_seqlens)
    if not grad:
        return _forward(q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens)
    max_seqlen = q.shape[1] if max_seqlen is None else max_seqlen
    return AlignedLightningFunction.apply(q, k, v, log_decay, scale, initial_state, output_final_state,
                                          cu_seqlens, max_seqlen, default_config(q.shape[-1], q.dtype), None)
