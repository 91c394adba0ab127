"""Readable PyTorch references for Lightning attention (linear attention with a per-head decay).

For each head h with decay λ_h = exp(log_decay[h]) and state S ∈ R^{D×D} (keys × values):

    S_t = λ_h S_{t-1} + k_tᵀ v_t,        o_t = scale · q_t S_t

so `o_t = scale · q_t (λ^{t+1} S_{-1} + Σ_{s≤t} λ^{t-s} k_sᵀ v_s)`. Three equivalent forms follow:
quadratic (a decay mask over all pairs), chunked (Lightning Attention-2 tiling: exact inside a
chunk, the state carried between chunks) and recurrent (token by token). All take q, k, v of
shape [B, T, H, D], an optional initial state [B, H, D, D] and return (o, final_state). Work is done
in float32 (float64 when the inputs are float64); `o` comes back in the input dtype and the state
in the working precision. Every decay factor is exp of a non-positive number.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _prepare(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, scale: float | None,
             initial_state: Tensor | None):
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, T, H, D = q.shape
    scale = D**-0.5 if scale is None else scale
    # [B, H, T, D] in the working precision
    q, k, v = (x.to(work).transpose(1, 2) for x in (q, k, v))
    g = log_decay.to(device=q.device, dtype=work)
    state = (torch.zeros(B, H, D, v.shape[-1], device=q.device, dtype=work) if initial_state is None
             else initial_state.to(work))
    return q * scale, k, v, g, state


def _decay_mask(g: Tensor, n: int) -> Tensor:
    """[H, n, n] with λ^(i-j) for i ≥ j and 0 above the diagonal."""
    i = torch.arange(n, device=g.device)
    distance = (i[:, None] - i[None, :]).to(g.dtype)
    mask = torch.exp(g[:, None, None] * distance.clamp(min=0))
    return mask * (distance >= 0)


def lightning_attn_quadratic(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor,
                             scale: float | None = None,
                             initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    out_dtype, T = q.dtype, q.shape[1]
    q, k, v, g, state = _prepare(q, k, v, log_decay, scale, initial_state)
    t = torch.arange(T, device=q.device, dtype=g.dtype)
    o = (q @ k.transpose(-1, -2) * _decay_mask(g, T)) @ v
    o = o + torch.exp(g[:, None] * (t + 1))[..., None] * (q @ state)
    to_end = torch.exp(g[:, None] * (T - 1 - t))[..., None]  # [H, T, 1]: λ^(T-1-s)
    final = torch.exp(g * T)[:, None, None] * state + (k * to_end).transpose(-1, -2) @ v
    return o.transpose(1, 2).to(out_dtype), final


def lightning_attn_chunked(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor,
                           scale: float | None = None, initial_state: Tensor | None = None,
                           chunk_size: int = 64) -> tuple[Tensor, Tensor]:
    out_dtype, T = q.dtype, q.shape[1]
    q, k, v, g, state = _prepare(q, k, v, log_decay, scale, initial_state)
    outputs = []
    for start in range(0, T, chunk_size):
        qc, kc, vc = (x[:, :, start:start + chunk_size] for x in (q, k, v))
        n = qc.shape[2]
        i = torch.arange(n, device=q.device, dtype=g.dtype)
        intra = (qc @ kc.transpose(-1, -2) * _decay_mask(g, n)) @ vc
        inter = torch.exp(g[:, None] * (i + 1))[..., None] * (qc @ state)
        outputs.append(intra + inter)
        to_end = torch.exp(g[:, None] * (n - 1 - i))[..., None]
        state = torch.exp(g * n)[:, None, None] * state + (kc * to_end).transpose(-1, -2) @ vc
    o = torch.cat(outputs, dim=2) if outputs else torch.zeros_like(v)
    return o.transpose(1, 2).to(out_dtype), state


def lightning_attn_recurrent(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor,
                             scale: float | None = None, initial_state: Tensor | None = None,
                             cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Token by token. With `cu_seqlens` ([N+1] offsets, B = 1) the N sequences packed along T
    advance side by side, one token each per step, from `initial_state` [N, H, D, D].

    A token's arithmetic does not depend on the other rows of its step, nor on whether it came in
    a long run or alone: under `batch_invariant()` this one form serves training, prefill and decode."""
    out_dtype, (B, T, H, D) = q.dtype, q.shape
    if cu_seqlens is None:
        cu_seqlens = torch.arange(B + 1, device=q.device) * T
        q, k, v = (x.reshape(1, B * T, H, D) for x in (q, k, v))
    starts, lengths = cu_seqlens[:-1], cu_seqlens[1:] - cu_seqlens[:-1]
    N = lengths.shape[0]
    if initial_state is None:
        initial_state = torch.zeros(N, H, D, D, device=q.device)
    q, k, v, g, state = _prepare(q, k, v, log_decay, scale, initial_state)  # [1, H, B*T, D]
    q, k, v = (x[0].transpose(0, 1) for x in (q, k, v))  # [B*T, H, D]
    decay = torch.exp(g)[:, None, None]
    outputs = []
    for t in range(int(lengths.max()) if N else 0):
        rows = (starts + t).clamp(max=q.shape[0] - 1)
        running = (lengths > t)[:, None, None, None]
        state = torch.where(running, decay * state + k[rows, :, :, None] * v[rows, :, None, :], state)
        outputs.append((q[rows, :, None, :] @ state)[:, :, 0])
    sequence = torch.repeat_interleave(torch.arange(N, device=q.device), lengths)
    step = torch.arange(q.shape[0], device=q.device) - starts[sequence]
    o = torch.stack(outputs)[step, sequence] if outputs else torch.zeros_like(q)
    return o.reshape(B, T, H, D).to(out_dtype), state


def lightning_decode_reference(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, state: Tensor,
                               slots: Tensor, scale: float | None = None) -> Tensor:
    """One token for each of N sequences (q, k, v: [N, H, D]); updates `state[slots]` in place."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = state[slots]
    work = s.dtype
    s = torch.exp(log_decay.to(work))[:, None, None] * s + k.to(work)[..., :, None] * v.to(work)[..., None, :]
    state[slots] = s
    return ((scale * q.to(work))[..., None, :] @ s).squeeze(-2).to(q.dtype)
