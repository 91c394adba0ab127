"""Rejection sampling of draft trees (SpecInfer's multi-draft rule; a chain is a tree with one branch):
the tokens it emits are distributed exactly as the target model's own samples, whatever the drafts.

At a node whose target distribution is p, the children's tokens x_c (each drawn from a draft
distribution q_c, or chosen outright: q_c is then one-hot) are tried in order against the residual
r, first p: child c is accepted with probability min(1, r(x_c) / q_c(x_c)) and the walk moves on to
it; a rejection leaves r ← norm(max(0, r - q_c)). When every child is rejected, the next token is
drawn from r; at a leaf it is drawn from the leaf's p (the bonus token). Greedy requests take the
child whose token is p's argmax, else the argmax itself, so they emit what greedy decoding would.
"""

from __future__ import annotations

import torch
from torch import Tensor


def accept_tree(parents: list[int], draft_tokens: Tensor, target_probs: Tensor, draft_probs: Tensor | None = None,
                greedy: bool = False, generator: torch.Generator | None = None) -> tuple[list[int], int]:
    """One sequence's tree of m nodes: node 0 is the root (its last accepted token), nodes 1.. the
    drafts, parents before children (`parents[0] = -1`). draft_tokens [m] (entry 0 unused);
    target_probs [m, V]: the target's next-token distribution after each node, temperature and
    filters applied (greedy: any scores, only their argmax counts); draft_probs [m, V]: the
    distribution each node's token was drawn from, or None for drafts chosen deterministically.
    Returns the accepted draft nodes, root to leaf, and the token that follows them."""
    tokens = draft_tokens.tolist()
    if greedy:
        return greedy_path(parents, tokens, target_probs.argmax(-1).tolist())
    children = _children(parents)
    path, node = [], 0
    while True:
        child, residual = _try_children(children[node], tokens, target_probs[node], draft_probs, generator)
        if child is None:
            return path, int(torch.multinomial(residual, 1, generator=generator))
        node = child
        path.append(node)


def greedy_path(parents: list[int], tokens: list[int], best: list[int]) -> tuple[list[int], int]:
    """`accept_tree` for a greedy request, from the target's argmax after each node (`best`, on the
    host: a batch of trees reads them back at once): the child whose token is its parent's argmax,
    down to a node that has none, then that node's argmax."""
    children = _children(parents)
    path, node = [], 0
    while True:
        match = [c for c in children[node] if tokens[c] == best[node]]
        if not match:
            return path, best[node]
        node = match[0]
        path.append(node)


def _children(parents: list[int]) -> list[list[int]]:
    children: list[list[int]] = [[] for _ in parents]
    for node, parent in enumerate(parents[1:], start=1):
        children[parent].append(node)
    return children


def _try_children(children: list[int], tokens: list[int], residual: Tensor, draft_probs: Tensor | None,
                  generator: torch.Generator | None) -> tuple[int | None, Tensor]:
    """The accepted child (None if all are rejected) and the residual distribution left."""
    for child in children:
        x = tokens[child]
        q = (torch.nn.functional.one_hot(torch.tensor(x, device=residual.device), residual.shape[0]).to(residual)
             if draft_probs is None else draft_probs[child])
        u = torch.rand((), device=residual.device, generator=generator)
        if bool(u * q[x] < residual[x]):  # probability min(1, r(x) / q(x))
            return child, residual
        residual = (residual - q).clamp(min=0)
        residual = residual / residual.sum()  # > 0: a rejection means r(x) < q(x), so r > q elsewhere
    return None, residual
