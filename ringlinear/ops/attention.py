"""Causal softmax attention with grouped KV heads, over whole or packed sequences."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def document_ids(cu_seqlens: Tensor, seq_len: int) -> Tensor:
    """[T] index of the packed sequence each position belongs to."""
    positions = torch.arange(seq_len, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float,
                     cu_seqlens: Tensor | None = None) -> Tensor:
    """q: [B, Tq, H, D]; k, v: [B, Tk, KV, D] with Tk ≥ Tq and KV dividing H.

    Query i sits at key position Tk - Tq + i (new tokens after a cached prefix) and sees keys up to
    and including its own. With `cu_seqlens` (B = 1, Tq = Tk) a query sees only its own sequence.
    Returns [B, Tq, H, D].
    """
    Tq, Tk = q.shape[1], k.shape[1]
    if cu_seqlens is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return _flash_varlen(q, k, v, scale, cu_seqlens)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    gqa = q.shape[1] != k.shape[1]
    if cu_seqlens is None and Tq == Tk:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    elif cu_seqlens is None and Tq == 1:
        o = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    else:
        key_pos = torch.arange(Tk, device=q.device)
        query_pos = key_pos[Tk - Tq:]
        mask = key_pos[None, :] <= query_pos[:, None]
        if cu_seqlens is not None:
            doc = document_ids(cu_seqlens, Tk)
            mask = mask & (doc[None, :] == doc[Tk - Tq:, None])
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return o.transpose(1, 2)


def _flash_varlen(q: Tensor, k: Tensor, v: Tensor, scale: float, cu_seqlens: Tensor) -> Tensor:
    """Packed documents on CUDA through FlashAttention's varlen kernel (GQA native, differentiable);
    the aten op is what `torch.nn.attention.varlen` wraps, and its signature is stable across the
    PyTorch versions we support while the wrapper's is not."""
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    o = torch.ops.aten._flash_attention_forward(q[0], k[0], v[0], cu, cu, longest, longest, 0.0, True, False,
                                                scale=scale)[0]
    return o[None]
