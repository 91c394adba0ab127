"""Draft trees packed along T, as speculative decoding verifies them in one target forward.

Sequence n's tree is rows `query_start[n]:query_start[n + 1]` of the step (its m ≤ MAX_TREE_TOKENS
tokens, parents before children); `parents[i]` is the index within the same tree of token i's parent
and -1 for a root (the token after the cached prefix; several roots make a forest). A chain is the
tree whose parents are -1, 0, 1, ...

Every tree kernel reads the same two per-token tensors, computed once per step and shared by all
layers: `ancestors`, a bitmask whose bit j says that tree token j is token i or one of its ancestors
(the tokens that i attends to besides the prefix), and `depth`, the number of i's ancestors (0 for a
root), which places i at position prefix + depth and decays the prefix state by λ^(depth+1).
"""

from __future__ import annotations

import torch
from torch import Tensor

MAX_TREE_TOKENS = 64  # one int64 bitmask per token


def tree_ancestors(parents: Tensor, query_start: Tensor, max_tree_len: int) -> tuple[Tensor, Tensor]:
    """parents [T] int (tree-local, -1 for roots); query_start [N+1] int offsets along T;
    `max_tree_len` the largest tree (a host int, like paged attention's `max_query_len`: nothing here
    reads the device). Returns (ancestors [T] int64 bitmask, depth [T] int32)."""
    if not 0 <= max_tree_len <= MAX_TREE_TOKENS:
        raise ValueError(f"trees take at most {MAX_TREE_TOKENS} tokens each, got max_tree_len={max_tree_len}")
    T = parents.shape[0]
    if parents.dim() != 1 or query_start.dim() != 1:
        raise ValueError(f"parents must be [T] and query_start [N+1], got {list(parents.shape)}, "
                         f"{list(query_start.shape)}")
    start = query_start[:-1].long()[token_trees(query_start, T)]
    local = torch.arange(T, device=parents.device) - start
    parents = parents.long()
    parent_row = (start + parents).clamp(min=0)
    has_parent = parents >= 0
    own = torch.ones_like(local) << local
    ancestors, depth = own, torch.zeros_like(local)
    # each pass extends every token's known path by one level; a path has at most max_tree_len tokens
    for _ in range(max_tree_len - 1):
        ancestors = own | torch.where(has_parent, ancestors[parent_row], 0)
        depth = torch.where(has_parent, depth[parent_row] + 1, 0)
    return ancestors, depth.int()


def token_trees(query_start: Tensor, T: int) -> Tensor:
    """[T] long: the tree (sequence) of each of the T packed tokens."""
    lengths = query_start[1:] - query_start[:-1]
    return torch.repeat_interleave(torch.arange(lengths.shape[0], device=query_start.device), lengths, output_size=T)


def root_path_nodes(ancestors: Tensor, width: int) -> Tensor:
    """[T, width] long: column r holds the tree-local index of the r-th node of each token's root path
    (its ancestors-or-self in index order, root first: parents come before children); 0 past the path."""
    T, device = ancestors.shape[0], ancestors.device
    bits = (ancestors[:, None] >> torch.arange(width, device=device)) & 1  # [T, width]
    rank = torch.where(bits.bool(), bits.cumsum(1) - 1, width)  # the r-th set bit goes to column r; others to width
    path = torch.zeros(T, width + 1, dtype=torch.long, device=device)
    path.scatter_(1, rank, torch.arange(width, device=device).expand(T, -1))
    return path[:, :width]
