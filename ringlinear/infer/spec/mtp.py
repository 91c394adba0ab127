"""The MTP drafter: the checkpoint's multi-token-prediction layers propose the next tokens.

MTP layer 1 was trained to read, at position t, the target's final hidden state h_t and the embedding
of token t+1, and to predict token t+2 (`RingLinearForCausalLM._forward`). So once the target has
sampled token t+1, the drafter runs the layer over the positions it has not seen yet, with their
true inputs, and the best candidates of the last one's logits are the first depth of the tree.
Deeper nodes chain as vLLM does: a node at depth d feeds its token and its parent's output hidden
state into MTP layer d mod (number of layers) at the next position, and its children are the best
candidates of that step's logits; the nodes of one depth run as one batch. A chain is the tree of
one branch. The MTP layers are softmax layers with their own keys and values: an `MTPCache` per
sequence keeps the first layer's at the verified positions; a chained step attends to those and to
the keys its own ancestors computed at its layer (`_Branches`), which are dropped after the call,
since they were computed from drafts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ...model import RingLinearForCausalLM
from ...model.context import AttentionContext
from ...ops.attention import causal_attention
from ...ops.batch_invariant import numerics
from ...ops.policy import KernelPolicy
from .tree import DraftTree, Path, path_parents

KV = tuple[Tensor, Tensor]  # keys, values [B, positions, KV, D]


class MTPCache(AttentionContext):
    """One sequence's keys and values [1, positions, KV, D] of the first MTP layer at its verified
    positions (those it ran with true inputs)."""

    def __init__(self, policy: KernelPolicy):
        self.policy = policy
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self.num_verified = 0  # the sequence's positions that the first MTP layer has seen
        self._positions: Tensor | None = None

    def copy(self) -> MTPCache:
        """An independent cache with the same entries (a forked sequence's: it shares the prompt)."""
        other = MTPCache(self.policy)
        other.keys, other.values, other.num_verified = self.keys, self.values, self.num_verified
        return other

    def start(self, positions: Tensor) -> None:
        """The positions [T] of the next forward."""
        self._positions = positions

    def positions(self, batch: int, seq_len: int, device: torch.device) -> Tensor:
        return self._positions[None]

    def lightning(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor) -> Tensor:
        raise ValueError(f"layer {layer_idx}: MTP layers are softmax layers")

    def softmax(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        if self.keys is not None:
            k, v = torch.cat([self.keys, k], dim=1), torch.cat([self.values, v], dim=1)
        self.keys, self.values = k, v
        return causal_attention(q, k, v, scale, policy=self.policy)


class _Branches(AttentionContext):
    """One chained step of B tree nodes at the same position, one per batch row: each attends to the
    first layer's verified keys (when it runs that layer), to the keys its ancestors computed at its
    layer, and to its own; `computed` then holds its own."""

    def __init__(self, cache: MTPCache, first_layer: int, ancestors: KV | None):
        self.cache, self.first_layer, self.ancestors, self.policy = cache, first_layer, ancestors, cache.policy
        self.computed: KV | None = None

    def positions(self, batch: int, seq_len: int, device: torch.device) -> Tensor:
        raise ValueError("the drafter passes the rotary embedding of a chained step itself")

    def lightning(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor) -> Tensor:
        raise ValueError(f"layer {layer_idx}: MTP layers are softmax layers")

    def softmax(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        self.computed = (k, v)
        keys, values = [k], [v]
        if self.ancestors is not None:
            keys.insert(0, self.ancestors[0])
            values.insert(0, self.ancestors[1])
        if layer_idx == self.first_layer and self.cache.keys is not None:
            batch = k.shape[0]
            keys.insert(0, self.cache.keys.expand(batch, -1, -1, -1))
            values.insert(0, self.cache.values.expand(batch, -1, -1, -1))
        return causal_attention(q, torch.cat(keys, 1), torch.cat(values, 1), scale, policy=self.policy)


class MTPDrafter:
    def __init__(self, model: RingLinearForCausalLM, paths: Sequence[Path], policy: KernelPolicy = KernelPolicy()):
        """`paths`: the tree shape (`spec.tree`); a chain of k drafts is `chain_paths(k)`."""
        if not model.model.mtp_layers:
            raise ValueError("speculative_config.method 'mtp' needs MTP layers, but the model has "
                             "num_nextn_predict_layers=0")
        self.model, self.policy = model, policy
        self.paths, self.parents = tuple(paths), path_parents(paths)
        self.num_children: dict[Path, int] = {}
        for path in self.paths:
            self.num_children[path[:-1]] = max(self.num_children.get(path[:-1], 0), path[-1] + 1)

    def new_cache(self) -> MTPCache:
        return MTPCache(self.policy)

    @torch.no_grad()
    def propose(self, cache: MTPCache, hidden: Tensor, next_tokens: Tensor) -> DraftTree:
        """hidden [n, hidden]: the target's final hidden states (after `model.norm`) at the sequence's
        n positions after `cache.num_verified`; next_tokens [n]: the token that followed each (the
        last: the one just sampled). Returns the draft tree of the shape's paths (each node the
        ranked candidate its path names)."""
        with numerics(self.policy):
            return self._propose(cache, hidden, next_tokens)

    def _propose(self, cache: MTPCache, hidden: Tensor, next_tokens: Tensor) -> DraftTree:
        model, layers = self.model.model, self.model.model.mtp_layers
        positions = torch.arange(cache.num_verified, cache.num_verified + hidden.shape[0], device=hidden.device)
        cache.start(positions)
        h = layers[0](model.word_embeddings(next_tokens[None]), hidden[None], model.rotary(positions[None]), cache)
        cache.num_verified += positions.shape[0]
        position = positions[-1:]
        tokens: dict[Path, int] = {}
        # the nodes whose children are picked next: their paths, output hidden states [B, 1, hidden],
        # the layer that made them, and the keys their paths computed so far per layer
        parents, h, layer = [()], h[:, -1:], layers[0]
        chained: list[dict[int, KV]] = [{}]
        while parents:
            logits = self.model.lm_head(layer.final_layernorm(h, self.policy))  # [B, 1, V]
            ranked = logits[:, 0].topk(max(self.num_children[p] for p in parents), dim=-1).indices.tolist()
            for path, best in zip(parents, ranked):
                tokens.update(((*path, c), best[c]) for c in range(self.num_children[path]))
            expand = [i for i, p in enumerate(parents) for c in range(self.num_children[p])
                      if (*p, c) in self.num_children]
            children = [(*parents[i], c) for i, p in enumerate(parents) for c in range(self.num_children[p])
                        if (*p, c) in self.num_children]
            if not children:
                break
            depth = len(children[0])
            layer = layers[depth % len(layers)]
            own = [chained[i].get(layer.layer_idx) for i in expand]
            ancestors = None if own[0] is None else tuple(torch.cat([kv[j] for kv in own]) for j in (0, 1))
            branches = _Branches(cache, layers[0].layer_idx, ancestors)
            position = position + 1
            embedded = model.word_embeddings(torch.tensor([[tokens[c]] for c in children], device=hidden.device))
            h = layer(embedded, h[expand], model.rotary(position[None]), branches)
            k, v = branches.computed
            chained = [{**chained[i], layer.layer_idx: (k[b:b + 1], v[b:b + 1]) if own[b] is None else
                        (torch.cat([own[b][0], k[b:b + 1]], 1), torch.cat([own[b][1], v[b:b + 1]], 1))}
                       for b, i in enumerate(expand)]
            parents = children
        return DraftTree(tuple(tokens[p] for p in self.paths), self.parents)
