"""Lightning attention: the public entry points, input checks and kernel dispatch.

`lightning_attn` runs whole sequences (training, prefill); `lightning_decode` advances N sequences
by one token against a pool of fp32 states. The kernel policy (`ops.policy.lightning_kernel`) picks
the Triton kernels (`chunk.py`, `decode.py`) or the chunked reference in `naive.py`; in invariant
mode every call runs a recurrent form, one token per step, so that a token gets the same bits in
training, prefill and decode: `recurrent.py` on the Triton backend, else
`naive.lightning_attn_recurrent`. `lightning_tree_verify` and `lightning_tree_fold` verify draft
trees for speculative decoding and fold the accepted path into the state (`tree.py`, `tree_reference.py`).
"""

from __future__ import annotations

import functools
import importlib
import itertools
import weakref
from types import ModuleType

import torch
from torch import Tensor

from ..policy import (
    KernelPolicy,
    lightning_fold_kernel,
    lightning_kernel,
    lightning_tree_kernel,
)
from ..tree import MAX_TREE_TOKENS
from .naive import (
    lightning_attn_chunked,
    lightning_attn_quadratic,
    lightning_attn_recurrent,
    lightning_decode_reference,
)
from .tree_reference import (
    lightning_tree_fold_reference,
    lightning_tree_verify_quadratic,
    tree_paths,
)

__all__ = [
    "lightning_attn",
    "lightning_attn_chunked",
    "lightning_attn_quadratic",
    "lightning_attn_recurrent",
    "lightning_decode",
    "lightning_decode_reference",
    "lightning_tree_fold",
    "lightning_tree_fold_reference",
    "lightning_tree_verify",
    "lightning_tree_verify_quadratic",
]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# id(tensor) -> (a weak reference to it, the version at which its values were found negative):
# reading them back is a host sync on a GPU, so a layer's fixed decay buffer is checked once, and
# again only after an in-place change. A dict by id, as torch's WeakIdKeyDictionary costs
# microseconds a lookup, on every call; an entry leaves when its tensor dies.
_checked_decays: dict[int, tuple[weakref.ref, int]] = {}


def _check_decay(log_decay: Tensor, num_heads: int) -> None:
    if log_decay.shape != (num_heads,):
        raise ValueError(f"log_decay must have shape [H]=[{num_heads}], got {list(log_decay.shape)}")
    key = id(log_decay)
    ref, version = _checked_decays.get(key, (None, None))
    if (ref is not None and ref() is log_decay and version == log_decay._version) or _capturing():
        return
    if bool((log_decay >= 0).any()):
        raise ValueError("log_decay must be negative (log λ with 0 < λ < 1); got values >= 0: "
                         f"{log_decay.tolist()}")
    _checked_decays[key] = (weakref.ref(log_decay, lambda _: _checked_decays.pop(key, None)), log_decay._version)


@functools.cache
def _backend(name: str) -> ModuleType:
    """A Triton backend module (chunk, recurrent, decode), imported on first use: importing Triton
    fixes TRITON_INTERPRET for the process. Cached: an import statement costs microseconds a call."""
    return importlib.import_module(f"{__name__}.{name}")


def _check_cu_seqlens(cu_seqlens: Tensor, batch: int, seq_len: int, max_seqlen: int | None) -> int:
    """The longest packed sequence's length. Reading the offsets back is a host sync on a GPU (the
    engine would pay it in every Lightning layer of every prefill), so with `max_seqlen` given
    they are not read: only its range is checked."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError("cu_seqlens must be a 1-D int32/int64 tensor [N+1] of sequence offsets, got "
                         f"shape {list(cu_seqlens.shape)} dtype {cu_seqlens.dtype}")
    if batch != 1:
        raise ValueError(f"with cu_seqlens the sequences are packed along T, so B must be 1, got B={batch}")
    if max_seqlen is not None:
        if not 0 <= max_seqlen <= seq_len:
            raise ValueError(f"max_seqlen must be in [0, T={seq_len}], got {max_seqlen}")
        return max_seqlen
    if _capturing():
        raise ValueError("under CUDA-graph capture cu_seqlens needs max_seqlen: its offsets cannot be read back")
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {offsets[0]}")
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {offsets}")
    if offsets[-1] != seq_len:
        raise ValueError(f"cu_seqlens must end at T={seq_len}, got {offsets[-1]}")
    return max(b - a for a, b in itertools.pairwise(offsets))


def lightning_attn(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, scale: float | None = None,
                   initial_state: Tensor | None = None, output_final_state: bool = False,
                   cu_seqlens: Tensor | None = None, max_seqlen: int | None = None,
                   policy: KernelPolicy = KernelPolicy()) -> tuple[Tensor, Tensor | None]:
    """Causal linear attention with a per-head decay over whole sequences.

    q, k, v: [B, T, H, D]; log_decay: [H], negative; initial_state: [N, H, D, D] fp32 where N is B,
    or the number of packed sequences when `cu_seqlens` ([N+1] offsets into T, B = 1) is given.
    `max_seqlen` (with cu_seqlens, as in FlashAttention's varlen calls): the longest sequence's
    length, known on the host; given it, the offsets are trusted and never read back (no host sync,
    so the call can be captured in a CUDA graph), and it only plans the kernel's work: a wrong value
    costs speed, not correctness. Without it the offsets are read and checked.
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
    if cu_seqlens is None and max_seqlen is not None:
        raise ValueError("max_seqlen is the longest of the packed sequences: it needs cu_seqlens")
    longest = T if cu_seqlens is None else _check_cu_seqlens(cu_seqlens, B, T, max_seqlen)
    num_seqs = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if initial_state is not None and initial_state.shape != (num_seqs, H, D, D):
        raise ValueError(f"initial_state must have shape [N, H, D, D]={[num_seqs, H, D, D]}, "
                         f"got {list(initial_state.shape)}")
    match lightning_kernel(policy, q):
        case "chunk":
            return _backend("chunk").lightning_attn_triton(q, k, v, log_decay, scale, initial_state,
                                                           output_final_state, cu_seqlens, longest)
        case "recurrent":
            return _backend("recurrent").lightning_attn_recurrent_triton(q, k, v, log_decay, scale, initial_state,
                                                                         output_final_state, cu_seqlens, longest)
        case "recurrent_reference":
            o, final = lightning_attn_recurrent(q, k, v, log_decay, scale, initial_state, cu_seqlens)
            return o, final if output_final_state else None
        case "chunked_reference":
            return _chunked_reference(q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens)


def _chunked_reference(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, scale: float | None,
                       initial_state: Tensor | None, output_final_state: bool,
                       cu_seqlens: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """`lightning_attn_chunked` over each packed sequence in turn."""
    if cu_seqlens is None:
        o, final = lightning_attn_chunked(q, k, v, log_decay, scale, initial_state)
    else:
        offsets = cu_seqlens.tolist()  # the reference slices on the host
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


def _check_pool(state: Tensor, slots: Tensor, num_seqs: int, H: int, D: int) -> None:
    if state.dim() != 4 or state.shape[1:] != (H, D, D):
        raise ValueError(f"state must be a pool [S, H, D, D] with H={H}, D={D}, got {list(state.shape)}")
    if state.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"state must be float32, got {state.dtype}")
    if slots.shape != (num_seqs,) or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slots must be an int tensor [N]=[{num_seqs}], got shape {list(slots.shape)} "
                         f"dtype {slots.dtype}")


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
    _check_pool(state, slots, N, H, D)
    match lightning_kernel(policy, q):
        case "chunk":
            return _backend("decode").lightning_decode_triton(q, k, v, log_decay, state, slots, scale)
        case "recurrent":
            return _backend("recurrent").lightning_decode_recurrent_triton(q, k, v, log_decay, state, slots, scale)
        case "recurrent_reference":
            one_each = torch.arange(N + 1, device=q.device)
            o, state[slots] = lightning_attn_recurrent(q[None], k[None], v[None], log_decay, scale, state[slots],
                                                       cu_seqlens=one_each)
            return o[0]
        case "chunked_reference":
            return lightning_decode_reference(q, k, v, log_decay, state, slots, scale)


def lightning_tree_verify(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, state: Tensor, slots: Tensor,
                          ancestors: Tensor, depth: Tensor, query_start: Tensor, max_tree_len: int,
                          scale: float | None = None, policy: KernelPolicy = KernelPolicy()) -> Tensor:
    """Draft trees of N sequences packed along T (q, k, v [T, H, D]; `ops.tree` for query_start [N+1],
    the ancestor bitmasks and depths [T], and `max_tree_len`, a host int) over their prefix states
    `state[slots]`: token i sees the prefix and its ancestors-or-self. Writes no state; shape checks
    only: nothing reads the device. Returns o [T, H, D] in the dtype of q."""
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must all be [T, H, D], got {list(q.shape)}, {list(k.shape)}, "
                         f"{list(v.shape)}")
    T, H, D = q.shape
    N = query_start.shape[0] - 1
    _check_decay(log_decay, H)
    _check_pool(state, slots, N, H, D)
    if ancestors.shape != (T,) or depth.shape != (T,):
        raise ValueError(f"ancestors and depth must be [T]=[{T}], got {list(ancestors.shape)}, {list(depth.shape)}")
    if not 1 <= max_tree_len <= MAX_TREE_TOKENS:
        raise ValueError(f"max_tree_len must be in [1, {MAX_TREE_TOKENS}], got {max_tree_len}")
    match lightning_tree_kernel(policy, q):
        case "tree":
            from .tree import lightning_tree_verify_triton
            return lightning_tree_verify_triton(q, k, v, log_decay, state, slots, ancestors, depth, query_start,
                                                max_tree_len, scale)
        case "tree_reference":
            return lightning_tree_verify_quadratic(q, k, v, log_decay, state, slots, ancestors, depth,
                                                   query_start, scale)
        case "root_paths":
            L = max_tree_len
            rows = tree_paths(ancestors, depth, query_start, L).flatten()
            prefix = state[slots.long()].repeat_interleave(query_start[1:] - query_start[:-1], dim=0, output_size=T)
            cu_seqlens = torch.arange(0, T * L + 1, L, device=q.device)
            o, _ = lightning_attn(q[rows][None], k[rows][None], v[rows][None], log_decay, scale, prefix,
                                  cu_seqlens=cu_seqlens, max_seqlen=L, policy=policy)
            return o[0].view(T, L, H, D)[torch.arange(T, device=q.device), depth.long()]


def lightning_tree_fold(k: Tensor, v: Tensor, log_decay: Tensor, state: Tensor, slots: Tensor, accepted: Tensor,
                        num_accepted: Tensor, policy: KernelPolicy = KernelPolicy()) -> None:
    """Fold each sequence's accepted path into its state: `state[slots[n]]` (in place) takes rows
    `accepted[n, :num_accepted[n]]` of k, v [T, H, D], root first, as that many decode steps would."""
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"k, v must be [T, H, D], got {list(k.shape)}, {list(v.shape)}")
    _, H, D = k.shape
    N = slots.shape[0]
    _check_decay(log_decay, H)
    _check_pool(state, slots, N, H, D)
    if accepted.dim() != 2 or accepted.shape[0] != N or num_accepted.shape != (N,):
        raise ValueError(f"accepted must be [N, max_accepted] and num_accepted [N] for N={N}, got "
                         f"{list(accepted.shape)}, {list(num_accepted.shape)}")
    match lightning_fold_kernel(policy, k):
        case "tree":
            from .tree import lightning_tree_fold_triton
            lightning_tree_fold_triton(k, v, log_decay, state, slots, accepted, num_accepted)
        case "fold_reference":
            lightning_tree_fold_reference(k, v, log_decay, state, slots, accepted, num_accepted)
