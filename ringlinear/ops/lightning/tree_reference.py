"""Readable PyTorch references for verifying draft trees with Lightning attention (`ops.tree` has the
layout: trees packed along T, an ancestor bitmask and a depth per token).

Token i of a tree over a prefix whose state is S (the sequence's state slot) sees the prefix and its
own ancestors-or-self j, as if its root path had been decoded token by token:

    o_i = scale · q_i (λ^(d_i+1) S + Σ_{j ⪯ i} λ^(d_i-d_j) k_jᵀ v_j)

Verifying writes no state: the tokens are drafts. Once the target has accepted a path, `fold` adds
its tokens to the state, S ← λ S + kᵀ v one token at a time, the arithmetic of a decode step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..tree import root_path_nodes, token_trees


def _tree_mask(ancestors: Tensor, query_start: Tensor) -> Tensor:
    """[T, T] bool: token j is token i or one of its ancestors (same tree)."""
    T = ancestors.shape[0]
    sequence = token_trees(query_start, T)
    local = torch.arange(T, device=ancestors.device) - query_start[:-1].long()[sequence]
    bit = (ancestors[:, None] >> local[None, :]) & 1
    return (bit == 1) & (sequence[:, None] == sequence[None, :])


def lightning_tree_verify_quadratic(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, state: Tensor,
                                    slots: Tensor, ancestors: Tensor, depth: Tensor, query_start: Tensor,
                                    scale: float | None = None) -> Tensor:
    """q, k, v [T, H, D] (N trees packed); state pool [S, H, D, D], read at `slots` [N]. One masked
    product over all pairs of the step, then each tree's prefix term, in fp32 (fp64 for fp64 inputs).
    Reads query_start and slots on the host. Returns o [T, H, D]."""
    out_dtype, work = q.dtype, torch.float64 if q.dtype == torch.float64 else torch.float32
    D = q.shape[-1]
    scale = D**-0.5 if scale is None else scale
    g = log_decay.to(work)[:, None, None]  # [H, 1, 1]
    q, k, v = (x.to(work).transpose(0, 1) for x in (q, k, v))  # [H, T, D]
    d = depth.to(work)
    distance = (d[:, None] - d[None, :]).clamp(min=0)
    decay = torch.exp(g * distance) * _tree_mask(ancestors, query_start)  # [H, T, T]
    o = (q @ k.transpose(-1, -2) * decay) @ v
    prefix_decay = torch.exp(g * (d[:, None] + 1))  # [H, T, 1]
    starts = query_start.tolist()
    for n, slot in enumerate(slots.tolist()):
        rows = slice(starts[n], starts[n + 1])
        o[:, rows] += prefix_decay[:, rows] * (q[:, rows] @ state[slot].to(work))
    return (scale * o).transpose(0, 1).to(out_dtype)


def tree_paths(ancestors: Tensor, depth: Tensor, query_start: Tensor, max_tree_len: int) -> Tensor:
    """Every token's root path as rows along T, root first: [T, max_tree_len] long, each path padded
    after the token itself with its own row (what comes after a token changes nothing up to it).
    Parents precede children, so the ancestors in index order are the path. Nothing reads the device."""
    T, L, device = ancestors.shape[0], max_tree_len, ancestors.device
    start = query_start[:-1].long()[token_trees(query_start, T)]
    own = torch.arange(T, device=device) - start
    path = torch.where(torch.arange(L, device=device) <= depth[:, None], root_path_nodes(ancestors, L), own[:, None])
    return start[:, None] + path


def lightning_tree_fold_reference(k: Tensor, v: Tensor, log_decay: Tensor, state: Tensor, slots: Tensor,
                                  accepted: Tensor, num_accepted: Tensor) -> None:
    """Sequence n's accepted tokens are rows `accepted[n, :num_accepted[n]]` of k, v [T, H, D], root
    first; `state[slots[n]]` takes them one by one, in place, as decode steps would."""
    s = state[slots.long()]
    decay = torch.exp(log_decay.to(s.dtype))[:, None, None]
    for r in range(accepted.shape[1]):
        rows = accepted[:, r].long()
        update = decay * s + k[rows].to(s.dtype)[..., :, None] * v[rows].to(s.dtype)[..., None, :]
        s = torch.where((num_accepted > r)[:, None, None, None], update, s)
    state[slots.long()] = s
