"""Draft trees: the shape a drafter fills (vLLM's `speculative_token_tree`) and the tree it proposes.

A shape is a list of paths, each a tuple of child ranks: (0,) is the best candidate after the last
token, (1,) the second best, (0, 2) the third best after (0,). A chain of k drafts is the shape
(0,), (0, 0), ..., (0,)*k. Nodes are numbered in the order vLLM sorts the paths, by depth then rank,
so that parents come before their children and the first n nodes of a tree are a tree.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Sequence
from dataclasses import dataclass

Path = tuple[int, ...]


def chain_paths(k: int) -> tuple[Path, ...]:
    return tuple((0,) * depth for depth in range(1, k + 1))


def parse_paths(value: str | Sequence[Sequence[int]], max_nodes: int) -> tuple[Path, ...]:
    """The paths of `speculative_config.speculative_token_tree` (a list of lists or tuples, or its
    text, JSON or Python), checked and sorted; a ValueError naming the field otherwise."""
    name = "speculative_config.speculative_token_tree"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise ValueError(f"{name} is neither JSON nor a Python list of tuples: {value!r}") from None
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(f"{name} must be a non-empty list of paths such as [(0,), (1,), (0, 0)], got {value!r}")
    paths = []
    for path in value:
        if (not isinstance(path, list | tuple) or not path
                or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in path)):
            raise ValueError(f"{name}: each path must be a non-empty list of child ranks >= 0, got {path!r}")
        paths.append(tuple(path))
    known = set(paths)
    if len(known) != len(paths):
        raise ValueError(f"{name} names a path twice: {sorted(p for p in known if paths.count(p) > 1)[0]}")
    if len(paths) > max_nodes:
        raise ValueError(f"{name} has {len(paths)} nodes; at most {max_nodes} fit a verify step")
    for path in paths:
        if len(path) > 1 and path[:-1] not in known:
            raise ValueError(f"{name}: path {path} has no parent {path[:-1]}")
        if path[-1] > 0 and (*path[:-1], path[-1] - 1) not in known:
            raise ValueError(f"{name}: path {path} has no better-ranked sibling {(*path[:-1], path[-1] - 1)}")
    return tuple(sorted(paths, key=lambda p: (len(p), p)))


def path_parents(paths: Sequence[Path]) -> tuple[int, ...]:
    """Each node's parent: 0 the root (the last accepted token), j the j-th node (from 1)."""
    index = {path: i + 1 for i, path in enumerate(paths)}
    return tuple(index.get(path[:-1], 0) for path in paths)


@dataclass(frozen=True)
class DraftTree:
    """One sequence's drafts: node i + 1 is `tokens[i]`, a child of node `parents[i]` (0: the root,
    the sequence's last token). Parents come before their children."""
    tokens: tuple[int, ...] = ()
    parents: tuple[int, ...] = ()

    @classmethod
    def chain(cls, tokens: Sequence[int]) -> DraftTree:
        return cls(tuple(tokens), tuple(range(len(tokens))))

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def is_chain(self) -> bool:
        return self.parents == tuple(range(len(self.parents)))

    def first(self, n: int) -> DraftTree:
        """The tree of its first n nodes."""
        return DraftTree(self.tokens[:n], self.parents[:n])

    def depths(self) -> list[int]:
        """Of every node, the root's (0) included."""
        depth = [0]
        for parent in self.parents:
            depth.append(depth[parent] + 1)
        return depth
