"""Lightning attention: the public entry points, input checks and kernel dispatch.

`lightning_attn` runs whole sequences (training, prefill); `lightning_decode` advances N sequences
by one token against a pool of fp32 states. The kernel policy (`ops.policy.lightning_kernel`) picks
the Triton kernels (`chunk.py`, `decode.py`) or the chunked reference in `naive.py`; in invariant
mode every call runs a recurrent form, one token per step, so that a token gets the same bits in
training, prefill and decode: `recurrent.py` on the Triton backend, else
`naive.lightning_attn_recurrent`.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from ..policy import KernelPolicy, lightning_kernel
from .naive import (lightning_attn_chunked, lightning_attn_quadratic, lightning_attn_recurrent,
                    lightning_decode_reference)

__all__ = ["lightning_attn", "lightning_decode", "lightning_attn_chunked", "lightning_attn_quadratic",
           "lightning_attn_recurrent", "lightning_decode_reference"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# tensor -> version at which its values were found negative: reading them back is a host sync on a
# GPU, so a layer's fixed decay buffer is checked once, and again only after an in-place change
_checked_decays = WeakIdKeyDictionary()


def _check_decay(log_decay: Tensor, num_heads: int) -> None:
    if log_decay.shape != (num_heads,):
        raise ValueError(f"log_decay must have shape [H]=[{num_heads}], got {list(log_decay.shape)}")
    if _capturing() or _checked_decays.get(log_decay) == log_decay._version:
        return
    if bool((log_decay >= 0).any()):
        raise ValueError("log_decay must be negative (log λ with 0 < λ < 1); got values >= 0: "
                         f"{log_decay.tolist()}")
    _checked_decays[log_decay] = log_decay._version


def _check_cu_seqlens(cu_seqlens: Tensor, batch: int, seq_len: int) -> list[int]:
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError("cu_seqlens must be a 1-D int32/int64 tensor [N+1] of sequence offsets, got "
                         f"shape {list(cu_seqlens.shape)} dtype {cu_seqlens.dtype}")
    if batch != 1:
        raise ValueError(f"with cu_seqlens the sequences are packed along T, so B must be 1, got B={batch}")
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {offsets[0]}")
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {offsets}")
    if offsets[-1] != seq_len:
        raise ValueError(f"cu_seqlens must end at T={seq_len}, got {offsets[-1]}")
    return offsets


def lightning_attn(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, scale: float | None = None,
                   initial_state: Tensor | None = None, output_final_state: bool = False,
                   cu_seqlens: Tensor | None = None, policy: KernelPolicy = KernelPolicy()
                   ) -> tuple[Tensor, Tensor | None]:
    """Causal linear attention with a per-head decay over whole sequences.

    q, k, v: [B, T, H, D]; log_decay: [H], negative; initial_state: [N, H, D, D] fp32 where N is B,
    or the number of packed sequences when `cu_seqlens` ([N+1] offsets into T, B = 1) is given.
    Returns o [B, T, H, D] in the input dtype and, if asked, the final states [N, H, D, D] in fp32.
    Differentiable with respect to q, k, v and the initial state. `policy` picks the kernel.
    """
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, D], got shape {list(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have the same shape, got {list(q.shape)}, {list(k.shape)}, "
                         f"{list(v.shape)}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, T, H, D = q.shape
    _check_decay(log_decay, H)
    offsets = None if cu_seqlens is None else _check_cu_seqlens(cu_seqlens, B, T)
    num_seqs = B if offsets is None else len(offsets) - 1
    if initial_state is not None and initial_state.shape != (num_seqs, H, D, D):
        raise ValueError(f"initial_state must have shape [N, H, D, D]={[num_seqs, H, D, D]}, "
                         f"got {list(initial_state.shape)}")
    match lightning_kernel(policy, q):
        case "chunk":
            from .chunk import lightning_attn_triton
            return lightning_attn_triton(q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens,
                                         offsets)
        case "recurrent":
            from .recurrent import lightning_attn_recurrent_triton
            return lightning_attn_recurrent_triton(q, k, v, log_decay, scale, initial_state, output_final_state,
                                                   cu_seqlens, offsets)
        case "recurrent_reference":
            o, final = lightning_attn_recurrent(q, k, v, log_decay, scale, initial_state, cu_seqlens)
            return o, final if output_final_state else None
        case "chunked_reference":
            return _chunked_reference(q, k, v, log_decay, scale, initial_state, output_final_state, offsets)


def _chunked_reference(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, scale: float | None,
                       initial_state: Tensor | None, output_final_state: bool,
                       offsets: list[int] | None) -> tuple[Tensor, Tensor | None]:
    """`lightning_attn_chunked` over each packed sequence in turn."""
    if offsets is None:
        o, final = lightning_attn_chunked(q, k, v, log_decay, scale, initial_state)
    else:
        outputs, finals = [], []
        for n, (start, end) in enumerate(zip(offsets, offsets[1:])):
            state = None if initial_state is None else initial_state[n:n + 1]
            o_n, final_n = lightning_attn_chunked(q[:, start:end], k[:, start:end], v[:, start:end],
                                                  log_decay, scale, state)
            outputs.append(o_n)
            finals.append(final_n)
        o, final = torch.cat(outputs, dim=1), torch.cat(finals)
    if not output_final_state:
        return o, None
    return o, final if final.dtype == torch.float64 else final.float()


def lightning_decode(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, state: Tensor, slots: Tensor,
                     scale: float | None = None, policy: KernelPolicy = KernelPolicy()) -> Tensor:
    """One decode step for N sequences: q, k, v [N, H, D]; state pool [S, H, D, D] fp32, updated in
    place at rows `slots` [N]. No host synchronisation and no allocation in the Triton path, so it
    can be captured in a CUDA graph. Returns o [N, H, D] in the dtype of q."""
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must all be [N, H, D], got {list(q.shape)}, {list(k.shape)}, "
                         f"{list(v.shape)}")
    N, H, D = q.shape
    _check_decay(log_decay, H)
    if state.dim() != 4 or state.shape[1:] != (H, D, D):
        raise ValueError(f"state must be a pool [S, H, D, D] with H={H}, D={D}, got {list(state.shape)}")
    if state.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"state must be float32, got {state.dtype}")
    if slots.shape != (N,) or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slots must be an int tensor [N]=[{N}], got shape {list(slots.shape)} "
                         f"dtype {slots.dtype}")
    match lightning_kernel(policy, q):
        case "chunk":
            from .decode import lightning_decode_triton
            return lightning_decode_triton(q, k, v, log_decay, state, slots, scale)
        case "recurrent":
            from .recurrent import lightning_decode_recurrent_triton
            return lightning_decode_recurrent_triton(q, k, v, log_decay, state, slots, scale)
        case "recurrent_reference":
            one_each = torch.arange(N + 1, device=q.device)
            o, state[slots] = lightning_attn_recurrent(q[None], k[None], v[None], log_decay, scale, state[slots],
                                                       cu_seqlens=one_each)
            return o[0]
        case "chunked_reference":
            return lightning_decode_reference(q, k, v, log_decay, state, slots, scale)
