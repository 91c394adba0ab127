"""The n-gram (prompt-lookup) drafter: no weights, just the sequence's own tokens. Where the text
repeats itself (code, quotes of the prompt), what followed an earlier occurrence of the last few
tokens is a good guess of what follows them now.

Candidates, best first: the continuations of the earlier occurrences of the longest matching suffix
(of prompt_lookup_min..max tokens), most recent first, then those of shorter suffixes. A chain takes
the best one; a tree shape takes them as branches: the candidates form a trie, each node's children
ranked by their best candidate, and path (c₀, c₁, ...) is the c₀-th child of the root, then its
c₁-th child, and so on. Nodes the candidates do not reach are left out of the sequence's tree.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .tree import DraftTree, Path

MAX_CANDIDATES_PER_NODE = 4  # distinct continuations read per node of the shape, at most


class NgramProposer:
    def __init__(self, paths: Sequence[Path], prompt_lookup_min: int, prompt_lookup_max: int):
        self.paths, self.min_n, self.max_n = tuple(paths), prompt_lookup_min, prompt_lookup_max
        self.depth = max(len(p) for p in self.paths)

    def candidates(self, token_ids: Sequence[int]) -> list[list[int]]:
        """Distinct continuations of up to `depth` tokens, best first (see the module's docstring)."""
        tokens = np.asarray(token_ids, dtype=np.int64)
        starts: dict[int, None] = {}  # ordered set of where continuations start
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)  # all but the suffix itself
            hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            starts.update((int(hit) + n, None) for hit in hits[::-1])
        found, seen = [], set()
        for start in starts:
            continuation = tuple(tokens[start:start + self.depth].tolist())
            if continuation not in seen:
                seen.add(continuation)
                found.append(list(continuation))
                if len(found) == MAX_CANDIDATES_PER_NODE * len(self.paths):
                    break  # repetitive text has thousands of matches; the best few fill the shape
        return found

    def propose(self, token_ids: Sequence[int]) -> DraftTree:
        """The tree shape's nodes that the candidates fill (none if the suffix never occurred)."""
        trie: dict[Path, list[int]] = {(): []}  # node (by ranks) -> its children's tokens, by rank
        node_of: dict[tuple[int, ...], Path] = {(): ()}  # token prefix -> node
        for candidate in self.candidates(token_ids):
            for depth in range(1, len(candidate) + 1):
                prefix = tuple(candidate[:depth])
                if prefix not in node_of:
                    parent = node_of[prefix[:-1]]
                    node_of[prefix] = (*parent, len(trie[parent]))
                    trie[parent].append(prefix[-1])
                    trie[node_of[prefix]] = []
        index: dict[Path, int] = {(): 0}
        tokens, parents = [], []
        for path in self.paths:  # parents first: a missing parent leaves its subtree out
            parent = path[:-1]
            if parent in index and path[-1] < len(trie.get(parent, ())):
                tokens.append(trie[parent][path[-1]])
                parents.append(index[parent])
                index[path] = len(tokens)
        return DraftTree(tuple(tokens), tuple(parents))
