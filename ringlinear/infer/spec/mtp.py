"""The MTP drafter: the checkpoint's multi-token-prediction layers propose the next tokens.

MTP layer 1 was trained to read, at position t, the target's final hidden state h_t and the embedding
of token t+1, and to predict token t+2 (`RingLinearForCausalLM._forward`). So once the target has
sampled token t+1, the drafter runs the layer over the positions it has not seen yet, with their
true inputs, and the best candidates of the last one's logits are the first depth of the tree.
Deeper nodes chain as vLLM does: a node at depth d feeds its token and its parent's output hidden
state into MTP layer d mod (number of layers) at the next position, and its children are the best
candidates of that step's logits. A chain is the tree of one branch. One call drafts for every
sequence of an engine step: the first pass packs all their new positions in one forward, and each
chained depth runs the nodes of every tree as one batch; only attention is per sequence. The MTP
layers are softmax layers with their own keys and values (an MLA layer's: its latent and rope key per
position, as the engine's pages keep them, attended in the absorbed form): an
`MTPCache` per sequence keeps the first layer's at the verified positions; a chained step attends to
those and to the entries its own ancestors computed at its layer (`_Branches`), which are dropped
after the call, since they came from drafts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ...model import RingLinearForCausalLM
from ...model.context import AttentionContext
from ...ops.attention import causal_attention
from ...ops.batch_invariant import numerics
from ...ops.paged_latent_attention import paged_latent_attention
from ...ops.policy import KernelPolicy
from .tree import DraftTree, Path, path_parents

KV = tuple[Tensor, Tensor]  # keys, values [B, positions, KV, D]; MLA: latents [B, positions, r], rope keys


def _attention(q: Tensor, entries: KV, kv_b: Tensor | None, scale: float, policy: KernelPolicy) -> Tensor:
    """q [B, Tq, H, ·] attending causally to B sequences of entries [B, L, ...], its tokens the last:
    keys and values, or an MLA layer's latents and rope keys in the absorbed form (each sequence read
    as one page of latents, never expanded into heads)."""
    if kv_b is None:
        return causal_attention(q, *entries, scale, policy=policy)
    B, Tq, L = q.shape[0], q.shape[1], entries[0].shape[1]
    device = q.device
    pages = torch.cat(entries, dim=-1)  # [B, L, r + rope]: sequence b is page b
    o = paged_latent_attention(q.flatten(0, 1), pages, kv_b, torch.arange(B, dtype=torch.int32, device=device)[:, None],
                               torch.full((B,), L, dtype=torch.int32, device=device),
                               torch.arange(0, B * Tq + 1, Tq, dtype=torch.int32, device=device), scale, Tq,
                               policy=policy)
    return o.unflatten(0, (B, Tq))


class MTPCache:
    """One sequence's keys and values [1, positions, KV, D] of the first MTP layer at its verified
    positions (those it ran with true inputs); for an MLA layer its latents [1, positions, r] and rope
    keys [1, positions, rope] (576 values a position at the published shapes, against 20,480 for the
    64 heads' keys and values). They live in buffers that double when full, so a step appends its
    positions in place instead of copying the whole history."""

    def __init__(self) -> None:
        self._storage: tuple[Tensor, Tensor] | None = None
        self._length = 0
        self.num_verified = 0  # the sequence's positions that the first MTP layer has seen

    @property
    def keys(self) -> Tensor | None:
        return None if self._storage is None else self._storage[0][:, :self._length]

    @property
    def values(self) -> Tensor | None:
        return None if self._storage is None else self._storage[1][:, :self._length]

    def copy(self) -> MTPCache:
        """An independent cache with the same entries (a forked sequence's: it shares the prompt)."""
        other = MTPCache()
        if self._storage is not None:
            other._storage = tuple(b.clone() for b in self._storage)
        other._length, other.num_verified = self._length, self.num_verified
        return other

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append new verified keys and values [1, n, KV, D] (or latents and rope keys); returns all of them."""
        end = self._length + k.shape[1]
        if self._storage is None or end > self._storage[0].shape[1]:
            capacity = max(64, 2 * end)
            grown = tuple(x.new_empty(1, capacity, *x.shape[2:]) for x in (k, v))
            if self._storage is not None:
                for new, old in zip(grown, self._storage):
                    new[:, :self._length] = old[:, :self._length]
            self._storage = grown
        self._storage[0][:, self._length:end] = k
        self._storage[1][:, self._length:end] = v
        self._length = end
        return self.keys, self.values


class _SoftmaxOnly(AttentionContext):
    def positions(self, batch: int, seq_len: int, device: torch.device) -> Tensor:
        raise ValueError("the drafter passes the rotary embedding itself")

    def lightning(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor) -> Tensor:
        raise ValueError(f"layer {layer_idx}: MTP layers are softmax layers")


class _Verified(_SoftmaxOnly):
    """The first pass: every sequence's new positions packed along T (B = 1), each run of rows
    attending causally to its own cache and itself, whose keys and values it then keeps."""

    def __init__(self, caches: list[MTPCache], lengths: list[int], policy: KernelPolicy):
        self.caches, self.lengths, self.policy = caches, lengths, policy

    def softmax(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        return self._attend(q, (k, v), None, scale)

    def latent_attention(self, layer_idx: int, q: Tensor, latent: Tensor, k_rope: Tensor, kv_b: Tensor,
                         scale: float) -> Tensor:
        return self._attend(q, (latent, k_rope), kv_b, scale)

    def _attend(self, q: Tensor, new: KV, kv_b: Tensor | None, scale: float) -> Tensor:
        outputs = []
        for cache, q_i, *new_i in zip(self.caches, *(x.split(self.lengths, dim=1) for x in (q, *new))):
            entries = cache.extend(*new_i)
            outputs.append(_attention(q_i, entries, kv_b, scale, self.policy))
        return torch.cat(outputs, dim=1)


class _Branches(_SoftmaxOnly):
    """One chained depth: the tree nodes of every sequence at the same depth, one per batch row (a
    sequence's rows consecutive, `groups`: its cache and row count). Each attends to its sequence's
    verified keys (when it runs the first layer), to the keys its ancestors computed at its layer,
    and to its own; `computed` then holds its own."""

    def __init__(self, groups: list[tuple[MTPCache, int]], first_layer: int, ancestors: KV | None,
                 policy: KernelPolicy):
        self.groups, self.first_layer, self.ancestors, self.policy = groups, first_layer, ancestors, policy
        self.computed: KV | None = None

    def softmax(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        return self._attend(layer_idx, q, (k, v), None, scale)

    def latent_attention(self, layer_idx: int, q: Tensor, latent: Tensor, k_rope: Tensor, kv_b: Tensor,
                         scale: float) -> Tensor:
        return self._attend(layer_idx, q, (latent, k_rope), kv_b, scale)

    def _attend(self, layer_idx: int, q: Tensor, new: KV, kv_b: Tensor | None, scale: float) -> Tensor:
        self.computed = new
        a, b = new
        if self.ancestors is not None:
            a, b = torch.cat([self.ancestors[0], a], 1), torch.cat([self.ancestors[1], b], 1)
        if layer_idx != self.first_layer:
            return _attention(q, (a, b), kv_b, scale, self.policy)
        outputs = []
        sizes = [rows for _, rows in self.groups]
        for (cache, rows), q_i, a_i, b_i in zip(self.groups, *(x.split(sizes) for x in (q, a, b))):
            if cache.keys is not None:
                a_i = torch.cat([cache.keys.expand(rows, *cache.keys.shape[1:]), a_i], 1)
                b_i = torch.cat([cache.values.expand(rows, *cache.values.shape[1:]), b_i], 1)
            outputs.append(_attention(q_i, (a_i, b_i), kv_b, scale, self.policy))
        return torch.cat(outputs)


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

    def propose(self, cache: MTPCache, hidden: Tensor, next_tokens: Tensor) -> DraftTree:
        """One sequence's `propose_many`."""
        return self.propose_many([(cache, hidden, next_tokens)])[0]

    @torch.no_grad()
    def propose_many(self, requests: Sequence[tuple[MTPCache, Tensor, Tensor]]) -> list[DraftTree]:
        """For each sequence (cache, hidden [n, hidden], next_tokens [n]): hidden, the target's final
        hidden states (after `model.norm`) at its n positions after `cache.num_verified`; next_tokens,
        the token that followed each (the last: the one just sampled). Returns each one's draft tree
        of the shape's paths (each node the ranked candidate its path names)."""
        with numerics(self.policy):
            return self._propose(requests)

    def _propose(self, requests: Sequence[tuple[MTPCache, Tensor, Tensor]]) -> list[DraftTree]:
        model, layers = self.model.model, self.model.model.mtp_layers
        caches = [cache for cache, _, _ in requests]
        lengths = [hidden.shape[0] for _, hidden, _ in requests]
        device = requests[0][1].device
        positions = torch.cat([torch.arange(c.num_verified, c.num_verified + n, device=device)
                               for c, n in zip(caches, lengths)])
        hidden = torch.cat([h for _, h, _ in requests])[None]
        embedded = model.word_embeddings(torch.cat([t for _, _, t in requests])[None])
        h = layers[0](embedded, hidden, model.rotary(positions[None]), _Verified(caches, lengths, self.policy))
        last = torch.tensor(lengths, device=device).cumsum(0) - 1
        base = (positions[last] + 1).view(-1, 1)  # [B, 1] the first chained position of each sequence
        for cache, n in zip(caches, lengths):
            cache.num_verified += n
        # the nodes whose children are picked next, as (sequence, path), with their output hidden
        # states [R, 1, hidden], the layer that made them, and the keys their paths computed per layer;
        # each depth's ranked candidates stay on the device until the last depth has run (one sync a call)
        parents = [(b, ()) for b in range(len(requests))]
        h, layer, chained = h[0, last][:, None], layers[0], [{} for _ in requests]
        picked: list[tuple[list[tuple[int, Path]], Tensor]] = []
        while True:
            logits = self.model.lm_head(layer.final_layernorm(h, self.policy))[:, 0]  # [R, V]
            ranked = logits.topk(max(self.num_children[p] for _, p in parents), dim=-1).indices
            picked.append((parents, ranked))
            expand = [(i, c, (b, (*p, c))) for i, (b, p) in enumerate(parents) for c in range(self.num_children[p])
                      if (*p, c) in self.num_children]
            if not expand:
                break
            rows, children = [i for i, _, _ in expand], [child for _, _, child in expand]
            depth = len(children[0][1])
            layer = layers[depth % len(layers)]
            own = [chained[i].get(layer.layer_idx) for i in rows]
            ancestors = None if own[0] is None else tuple(torch.cat([kv[j] for kv in own]) for j in (0, 1))
            groups = [(caches[b], sum(1 for c, _ in children if c == b)) for b in dict.fromkeys(c for c, _ in children)]
            branches = _Branches(groups, layers[0].layer_idx, ancestors, self.policy)
            ranks = torch.tensor([c for _, c, _ in expand], device=device)
            embedded = model.word_embeddings(ranked[torch.tensor(rows, device=device), ranks][:, None])
            position = base[[b for b, _ in children]] + depth - 1  # [R, 1]
            h = layer(embedded, h[rows], model.rotary(position), branches)
            k, v = branches.computed
            chained = [{**chained[i], layer.layer_idx: (k[r:r + 1], v[r:r + 1]) if own[r] is None else
                        (torch.cat([own[r][0], k[r:r + 1]], 1), torch.cat([own[r][1], v[r:r + 1]], 1))}
                       for r, i in enumerate(rows)]
            parents = children
        tokens: list[dict[Path, int]] = [{} for _ in requests]
        for nodes, ranked in picked:
            for (b, path), best in zip(nodes, ranked.tolist()):
                tokens[b].update(((*path, c), best[c]) for c in range(self.num_children[path]))
        return [DraftTree(tuple(t[p] for p in self.paths), self.parents) for t in tokens]
