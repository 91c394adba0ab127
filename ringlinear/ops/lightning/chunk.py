"""Lightning attention in Triton: chunked forward and backward.

Per head, with λ = exp(g), g = log_decay[h] < 0, and chunks of BT tokens (n valid), the forward is

    o_i = scale · q_i (λ^(i+1) S + Σ_{j≤i} λ^(i-j) k_jᵀ v_j),      S ← λ^n S + Σ_j (λ^(n-1-j) k_j)ᵀ v_j

with the fp32 state held in registers across the chunk loop of one program, transposed: Sᵀ [BV, D]
is updated as Sᵀ ← λ^n Sᵀ + (λ^(n-1-j) v)ᵀ k, so k is a tensor-core operand straight from shared
memory (double-buffered by the pipeliner) and only the narrower v tile is decayed in registers
(measured on an H100: 5-9% faster than carrying S [D, BV]). Every decay factor is exp(g·m) with
m ≥ 0, so any λ over any length underflows to 0 at worst, never to inf/NaN.

The backward is the same scan run three more times with other roles ("query", "key", "value"):
    dq = scan(do, v, k)             forward in time, initial state S0ᵀ
    dk = scan(v, do, q)  reversed   initial state dSᵀ_final
    dv = scan(k, q, do)  reversed   initial state dS_final, its final state is dS0
where "reversed" runs over the sequence back to front with the decay exponents shifted by one
(λ^i on the query role, λ^(n-j) on the key role), still all ≥ 0. All three run in one launch.

Parallelism: one program per (sequence, head, role, D_v tile, segment). A long sequence is split
into segments of `seg_len` tokens; a first launch computes each segment's own state contribution
(from zero), and each program of the main launch starts from
    S_in(s) = λ^(s·LS) S0 + Σ_{s'<s} λ^((s-1-s')·LS) local(s'),
so B = 1 at 64K tokens still fills the GPU. Short sequences take a single launch. The plan needs
only host integers (tokens, sequences, the longest length), never the offsets themselves: reading
those back would be a host sync per call. The longest length is a hint: a sequence longer than the
grid's segments finishes in its last one, so a low hint costs speed, never correctness.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..launch import cdiv, needs_grad
from ..policy import LIGHTNING_HEAD_DIMS

BT = 64  # chunk length; segments are multiples of it


@dataclass(frozen=True)
class KernelConfig:
    block_v: int       # D_v tile of one program (the state it carries is [block_v, D] fp32)
    num_warps: int
    fwd_stages: int    # pipeline stages of the forward's chunk loop
    bwd_stages: int    # of the backward's
    local_stages: int  # of the segments' local-state pass (few registers: deeper prefetch fits)


@functools.cache  # called on every launch: a frozen dataclass costs microseconds to build
def default_config(head_dim: int, dtype: torch.dtype) -> KernelConfig:
    if dtype == torch.float32:  # tiles twice the bytes: no prefetch stage, narrower at D = 256
        return KernelConfig(block_v=32 if head_dim == 256 else 64, num_warps=8 if head_dim == 256 else 4,
                            fwd_stages=1, bwd_stages=1, local_stages=1)
    if head_dim == 256:
        return KernelConfig(block_v=64, num_warps=8, fwd_stages=1, bwd_stages=1, local_stages=2)
    if head_dim == 64:
        return KernelConfig(block_v=32, num_warps=4, fwd_stages=2, bwd_stages=2, local_stages=3)
    # H100, D = 128 (benchmarks/NOTES_lightning.md): a 3-stage forward loop prefetches a whole chunk
    # ahead at one program per SM (128 KB of shared memory) and beats 2 stages at two per SM by 5-9%;
    # the backward (three jobs) is up to 21% slower that way. Local pass: 3 stages 0.16 ms vs 2: 0.20 ms.
    return KernelConfig(block_v=64, num_warps=4, fwd_stages=3, bwd_stages=2, local_stages=3)


@triton.jit
def _bounds(cu_seqlens, i_n, T, IS_VARLEN: tl.constexpr):
    """First token (int64, into the flattened token axis) and length of sequence i_n."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        length = (tl.load(cu_seqlens + i_n + 1) - bos).to(tl.int32)
    else:
        bos = i_n.to(tl.int64) * T
        length = T
    return bos, length


@triton.jit
def _token_offsets(bos, length, pos, i_h, rev, H: tl.constexpr, D: tl.constexpr):
    """Element offsets of the rows at direction-local positions `pos` (reversed: from the end)."""
    t = tl.where(rev != 0, length - 1 - pos, pos)
    return ((bos + t) * H + i_h) * D


@triton.jit(do_not_specialize=["T", "LS", "total_segs"])
def _local_state_kernel(
    k, v, q, do, hl, cu_seqlens, log_decay, scale, T, LS, total_segs,
    H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    NJOBS: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Each full (non-last) segment's own state, from zero: job 0 forward over (k, v), job 1
    (backward only) reversed over (scale·q, do). Segment s of the sequence starting at token bos
    goes to slot bos // LS + s: distinct for all sequences, as a sequence of n tokens has at most
    n // LS full non-last segments, and fewer than (all tokens) // LS in all."""
    NV: tl.constexpr = D // BV
    pid = tl.program_id(0)
    i_s = tl.program_id(1)
    i_v = pid % NV
    job = (pid // NV) % NJOBS
    i_nh = pid // (NV * NJOBS)
    i_n = i_nh // H
    i_h = i_nh % H
    bos, length = _bounds(cu_seqlens, i_n, T, IS_VARLEN)
    if i_s >= tl.cdiv(length, LS) - 1:  # the last segment's own state is never needed
        return
    if job == 0:
        kr = k
        vr = v
    else:
        kr = q
        vr = do
    rev = job
    g = tl.load(log_decay + i_h).to(tl.float32)
    rows = tl.arange(0, BT)
    cols_k = tl.arange(0, D)
    cols_v = i_v * BV + tl.arange(0, BV)
    k_decay = tl.exp(g * (BT - 1 - rows + rev)) * tl.where(job == 0, 1.0, scale)
    chunk_decay = tl.exp(g * BT)
    S = tl.zeros([D, BV], dtype=tl.float32)
    for c in range(i_s * LS, (i_s + 1) * LS, BT):
        off = _token_offsets(bos, length, c + rows, i_h, rev, H, D)
        bk = tl.load(kr + off[:, None] + cols_k[None, :])
        bv = tl.load(vr + off[:, None] + cols_v[None, :])
        bk = (bk * k_decay[:, None]).to(bv.dtype)
        S = tl.dot(tl.trans(bk), bv, S * chunk_decay, input_precision=DOT_PREC)
    p = hl + ((job * total_segs + bos // LS + i_s) * H + i_h) * D * D
    tl.store(p + cols_k[:, None] * D + cols_v[None, :], S)


@triton.jit(do_not_specialize=["T", "LS", "total_segs"])
def _chunk_kernel(
    q, k, v, do, o, dk, dv, h0, dht, ht, hl, cu_seqlens, log_decay, scale, T, LS, total_segs,
    H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    NJOBS: tl.constexpr, HAS_H0: tl.constexpr, HAS_DHT: tl.constexpr, STORE_FINAL: tl.constexpr,
    SPLIT: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """The chunked scan. NJOBS = 1: forward (q, k, v) -> o, h0 -> ht. NJOBS = 3: the backward jobs
    dq, dk, dv as in the module docstring, writing into (o, dk, dv) and dS0 into ht."""
    NV: tl.constexpr = D // BV
    pid = tl.program_id(0)
    i_s = tl.program_id(1)
    i_v = pid % NV
    job = (pid // NV) % NJOBS
    i_nh = pid // (NV * NJOBS)
    i_n = i_nh // H
    i_h = i_nh % H
    bos, length = _bounds(cu_seqlens, i_n, T, IS_VARLEN)
    # an empty sequence still passes h0 on to ht; past the grid's segments, the last runs to the end
    nseg = tl.minimum(tl.maximum(tl.cdiv(length, LS), 1), tl.num_programs(1))
    if i_s >= nseg:
        return
    # roles; a job's states are read transposed when its key role is not the forward key dim
    if NJOBS == 1:
        qr, kr, vr, out, init = q, k, v, o, h0
    else:
        if job == 0:
            qr, kr, vr, out, init = do, v, k, o, h0
        elif job == 1:
            qr, kr, vr, out, init = v, do, q, dk, dht
        else:
            qr, kr, vr, out, init = k, q, do, dv, dht
    rev = tl.minimum(job, 1)
    has_init = tl.where(job == 0, HAS_H0, HAS_DHT)
    q_scale = tl.where(job == 0, scale, 1.0)
    k_scale = tl.where(job == 0, 1.0, scale)
    transposed = job < NJOBS - 1  # dq and dk (backward jobs 0, 1)
    stride_k = tl.where(transposed, 1, D)  # strides of S[key dim, value dim] in a stored state
    stride_v = tl.where(transposed, D, 1)

    g = tl.load(log_decay + i_h).to(tl.float32)
    rows = tl.arange(0, BT)
    cols_k = tl.arange(0, D)
    cols_v = i_v * BV + tl.arange(0, BV)
    state_offs = cols_v[:, None] * stride_v + cols_k[None, :] * stride_k  # of Sᵀ [BV, D]
    p0 = i_s * LS
    p1 = tl.where(i_s == nseg - 1, length, p0 + LS)

    S = tl.zeros([BV, D], dtype=tl.float32)  # Sᵀ
    if has_init:
        S += tl.load(init + i_nh.to(tl.int64) * D * D + state_offs) * tl.exp(g * p0)
    if SPLIT:
        slot = rev * total_segs + bos // LS  # as _local_state_kernel stores them
        for s in range(0, i_s):
            S += tl.load(hl + ((slot + s) * H + i_h) * D * D + state_offs) * tl.exp(g * ((i_s - 1 - s) * LS))

    dist = rows[:, None] - rows[None, :]
    intra_decay = tl.where(dist >= 0, tl.exp(g * tl.maximum(dist, 0)), 0.0) * (q_scale * k_scale)
    q_decay = tl.exp(g * (rows + 1 - rev)) * q_scale
    for c in range(p0, p1, BT):
        n = tl.minimum(p1 - c, BT)
        valid = (rows < n)[:, None]
        off = _token_offsets(bos, length, c + rows, i_h, rev, H, D)
        bq = tl.load(qr + off[:, None] + cols_k[None, :], mask=valid, other=0.0)
        bk = tl.load(kr + off[:, None] + cols_k[None, :], mask=valid, other=0.0)
        bv = tl.load(vr + off[:, None] + cols_v[None, :], mask=valid, other=0.0)
        dt = bv.dtype
        A = tl.dot(bq, tl.trans(bk), input_precision=DOT_PREC) * intra_decay
        # decays applied to fp32 products where possible: fewer roundings to 16 bits
        bo = tl.dot(bq, tl.trans(S.to(dt)), input_precision=DOT_PREC) * q_decay[:, None]
        bo = tl.dot(A.to(dt), bv, bo, input_precision=DOT_PREC)
        tl.store(out + off[:, None] + cols_v[None, :], bo.to(out.dtype.element_ty), mask=valid)
        kv_decay = tl.exp(g * tl.maximum(n - 1 - rows + rev, 0)) * k_scale  # of row j's k_jᵀ v_j
        S = tl.dot(tl.trans((bv * kv_decay[:, None]).to(dt)), bk, S * tl.exp(g * n), input_precision=DOT_PREC)
    if STORE_FINAL:
        if (job == NJOBS - 1) & (i_s == nseg - 1):
            tl.store(ht + i_nh.to(tl.int64) * D * D + state_offs, S)


@dataclass(frozen=True)
class _Plan:
    seg_len: int
    max_segs: int    # segments of the longest sequence (grid axis 1)
    total_segs: int  # slots of the local-state buffer: (all tokens) // seg_len


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def _plan(device: torch.device, tokens: int, longest: int, programs_per_segment: int, full_per_sm: float,
          programs_per_sm: float, min_seg_len: int, seg_len: int | None) -> _Plan:
    """Cut the longest sequences into equal segments of at least `min_seg_len` tokens, as many as
    give `programs_per_sm`, unless the unsplit grid already has `full_per_sm` programs per SM: then a
    split would only add its pass."""
    longest = max(longest, 1)
    if seg_len is None:
        programs = programs_per_segment * max(tokens / longest, 1)  # in units of the longest sequence
        sms = _num_sms(device)
        segments = 1 if programs >= 0.9 * full_per_sm * sms else max(1, round(programs_per_sm * sms / programs))
        seg_len = max(min_seg_len, cdiv(cdiv(longest, segments), BT) * BT)
    if seg_len % BT:
        raise ValueError(f"seg_len must be a multiple of {BT}, got {seg_len}")
    seg_len = min(seg_len, cdiv(longest, BT) * BT)
    return _Plan(seg_len, cdiv(longest, seg_len), tokens // seg_len)


def _dot_precision(dtype: torch.dtype) -> str | None:
    return "ieee" if dtype == torch.float32 else None  # None: the default, for 16-bit operands


def _scan(q: Tensor, k: Tensor, v: Tensor, do: Tensor | None, log_decay: Tensor, scale: float,
          h0: Tensor | None, dht: Tensor | None, store_final: bool, cu_seqlens: Tensor | None,
          max_seqlen: int, config: KernelConfig, seg_len: int | None):
    """Forward (do is None): returns (o, ht). Backward: returns (dq, dk, dv, dh0)."""
    B, T, H, D = q.shape
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    backward = do is not None
    njobs = 3 if backward else 1
    nv = D // config.block_v
    # measured on an H100 (benchmarks/NOTES_lightning.md): the forward fills the GPU with one program
    # per SM (B4xT16K unsplit 0.40 ms vs 2 segments 0.51) and splits best to ~2 per SM (B1xT64K: 8
    # segments), the heavier backward to ~3.5 (B1xT64K: 5 segments, vs 3 segments 1.3x slower). On an
    # H200 a short prefill gains nothing from a split but its second launch: B1xT1K 29-36 us of device
    # time split vs 30 unsplit, 64 vs 37 us back to back; B1xT4K 4 segments 52 us vs 8: 56, 16: 77
    # (benchmarks/RESULTS.md). So the forward's segments are at least 1,024 tokens.
    plan = _plan(q.device, B * T, max_seqlen, njobs * nv * H, 3.5 if backward else 1.0, 3.5 if backward else 2.0,
                 4 * BT if backward else 16 * BT, seg_len)
    f32 = dict(device=q.device, dtype=torch.float32)
    none = torch.empty(0, **f32)  # stands for absent states; guarded by constexpr flags
    meta = dict(H=H, D=D, BT=BT, BV=config.block_v, IS_VARLEN=cu_seqlens is not None,
                DOT_PREC=_dot_precision(q.dtype), num_warps=config.num_warps)
    common = (cu_seqlens, log_decay, scale, T, plan.seg_len, plan.total_segs)
    split = plan.max_segs > 1
    hl = none
    if split:
        local_jobs = 2 if backward else 1
        hl = torch.empty(local_jobs, plan.total_segs, H, D, D, **f32)
        _local_state_kernel[(N * H * local_jobs * nv, plan.max_segs - 1)](
            k, v, q, do if backward else v, hl, *common, NJOBS=local_jobs, num_stages=config.local_stages, **meta)
    final = torch.empty(N, H, D, D, **f32) if store_final else none
    out = torch.empty_like(q)
    dk, dv = (torch.empty_like(k), torch.empty_like(v)) if backward else (out, out)
    _chunk_kernel[(N * H * njobs * nv, plan.max_segs)](
        q, k, v, do if backward else v, out, dk, dv, none if h0 is None else h0,
        none if dht is None else dht, final, hl, *common, NJOBS=njobs, HAS_H0=h0 is not None,
        HAS_DHT=dht is not None, STORE_FINAL=store_final, SPLIT=split,
        num_stages=config.bwd_stages if backward else config.fwd_stages, **meta)
    if backward:
        return out, dk, dv, final if store_final else None
    return out, final if store_final else None


class LightningAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens, max_seqlen,
                config, seg_len):
        o, ht = _scan(q, k, v, None, log_decay, scale, initial_state, None, output_final_state, cu_seqlens,
                      max_seqlen, config, seg_len)
        ctx.save_for_backward(q, k, v, log_decay, initial_state, cu_seqlens)
        ctx.scale, ctx.max_seqlen, ctx.config, ctx.seg_len = scale, max_seqlen, config, seg_len
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, log_decay, initial_state, cu_seqlens = ctx.saved_tensors
        dq, dk, dv, dh0 = _scan(q, k, v, do.contiguous(), log_decay, ctx.scale, initial_state,
                                None if dht is None else dht.float().contiguous(), initial_state is not None,
                                cu_seqlens, ctx.max_seqlen, ctx.config, ctx.seg_len)
        return dq, dk, dv, None, None, dh0, None, None, None, None, None


def kernel_inputs(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, scale: float | None,
                  initial_state: Tensor | None, cu_seqlens: Tensor | None):
    """The inputs as every Triton Lightning kernel (chunked, recurrent) takes them: a head dim and
    dtype they support, contiguous q, k, v, fp32 decays and state, a float scale."""
    D = q.shape[-1]
    if D not in LIGHTNING_HEAD_DIMS:
        raise ValueError(f"the Triton kernels support head dims {LIGHTNING_HEAD_DIMS}, got D={D}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the Triton kernels take fp16, bf16 or fp32 inputs, got {q.dtype}")
    scale = D**-0.5 if scale is None else float(scale)
    log_decay = log_decay.to(device=q.device, dtype=torch.float32).contiguous()
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.contiguous()
    return q.contiguous(), k.contiguous(), v.contiguous(), log_decay, scale, initial_state, cu_seqlens


def lightning_attn_triton(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, scale: float | None,
                          initial_state: Tensor | None, output_final_state: bool, cu_seqlens: Tensor | None,
                          max_seqlen: int | None, *, config: KernelConfig | None = None,
                          seg_len: int | None = None) -> tuple[Tensor, Tensor | None]:
    """Triton backend of `lightning_attn` (inputs already validated by the dispatcher).

    `max_seqlen`: the longest sequence's length, which plans the segments (None: T, its bound).
    `config` and `seg_len` (a multiple of 64) override the kernel defaults, in both directions; by
    default the forward and the backward (three times the programs) each pick their segments."""
    grad = needs_grad(q, k, v, initial_state)
    q, k, v, log_decay, scale, initial_state, cu_seqlens = kernel_inputs(q, k, v, log_decay, scale,
                                                                         initial_state, cu_seqlens)
    config = config or default_config(q.shape[-1], q.dtype)
    max_seqlen = q.shape[1] if max_seqlen is None else max_seqlen
    if not grad:
        return _scan(q, k, v, None, log_decay, scale, initial_state, None, output_final_state, cu_seqlens,
                     max_seqlen, config, seg_len)
    return LightningAttnFunction.apply(q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens,
                                       max_seqlen, config, seg_len)
