"""The MTP drafter: the checkpoint's multi-token-prediction layers propose the next tokens.

MTP layer 1 was trained to read, at position t, the target's final hidden state h_t and the embedding
of token t+1, and to predict token t+2 (`RingLinearForCausalLM._forward`). So once the target has
sampled token t+1, the drafter runs the layer over the positions it has not seen yet, with their
true inputs, and the last one's argmax is the first draft. Further drafts chain as vLLM does: step j
feeds the previous step's output hidden state and draft back into MTP layer j mod (number of layers)
at the next position. The MTP layers are softmax layers with their own keys and values (an MLA
layer's: its latent and rope key per position, as the engine's pages keep them): an `MTPCache` per
sequence keeps those of the verified positions and drops the chained steps' at the next call, since
those were computed from drafts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...model import RingLinearForCausalLM
from ...model.context import AttentionContext
from ...model.mla import decompress
from ...ops.attention import causal_attention
from ...ops.batch_invariant import numerics
from ...ops.policy import KernelPolicy


class MTPCache(AttentionContext):
    """One sequence's keys and values [1, positions, KV, D] per MTP layer; an MLA layer's latents
    [1, positions, r] and rope keys [1, positions, rope]."""

    def __init__(self, policy: KernelPolicy):
        self.policy = policy
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        self.verified: dict[int, int] = {}  # per layer: its leading entries computed from true inputs
        self.num_verified = 0  # the sequence's positions that the first MTP layer has seen
        self._positions: Tensor | None = None

    def copy(self) -> MTPCache:
        """An independent cache with the same entries (a forked sequence's: it shares the prompt)."""
        other = MTPCache(self.policy)
        other.keys, other.values, other.verified = dict(self.keys), dict(self.values), dict(self.verified)
        other.num_verified = self.num_verified
        return other

    def start(self, positions: Tensor) -> None:
        """The positions [T] of the next forward."""
        self._positions = positions

    def positions(self, batch: int, seq_len: int, device: torch.device) -> Tensor:
        return self._positions[None]

    def lightning(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor) -> Tensor:
        raise ValueError(f"layer {layer_idx}: MTP layers are softmax layers")

    def _append(self, layer_idx: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """The layer's entries with these new positions' after them."""
        if layer_idx in self.keys:
            keys = torch.cat([self.keys[layer_idx], keys], dim=1)
            values = torch.cat([self.values[layer_idx], values], dim=1)
        self.keys[layer_idx], self.values[layer_idx] = keys, values
        return keys, values

    def softmax(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        return causal_attention(q, *self._append(layer_idx, k, v), scale, policy=self.policy)

    def latent_attention(self, layer_idx: int, q: Tensor, latent: Tensor, k_rope: Tensor, kv_b: Tensor,
                         scale: float) -> Tensor:
        # the latents are what a position costs (576 values at the published shapes, against 20,480 for
        # the 64 heads' keys and values): decompressed for each call, not kept
        k, v = decompress(*self._append(layer_idx, latent, k_rope), kv_b, q.shape[2], q.shape[-1] - k_rope.shape[-1])
        return causal_attention(q, k, v, scale, policy=self.policy)

    def drop_drafts(self) -> None:
        """Forget what the chained steps computed from drafts."""
        for layer_idx, kept in self.verified.items():
            self.keys[layer_idx] = self.keys[layer_idx][:, :kept]
            self.values[layer_idx] = self.values[layer_idx][:, :kept]


class MTPDrafter:
    def __init__(self, model: RingLinearForCausalLM, num_speculative_tokens: int,
                 policy: KernelPolicy = KernelPolicy()):
        if not model.model.mtp_layers:
            raise ValueError("speculative_config.method 'mtp' needs MTP layers, but the model has "
                             "num_nextn_predict_layers=0")
        self.model, self.k, self.policy = model, num_speculative_tokens, policy

    def new_cache(self) -> MTPCache:
        return MTPCache(self.policy)

    @torch.no_grad()
    def propose(self, cache: MTPCache, hidden: Tensor, next_tokens: Tensor) -> Tensor:
        """hidden [n, hidden]: the target's final hidden states (after `model.norm`) at the sequence's
        n positions after `cache.num_verified`; next_tokens [n]: the token that followed each (the
        last: the one just sampled). Returns the k drafts [k] (each an argmax)."""
        with numerics(self.policy):
            return self._propose(cache, hidden, next_tokens)

    def _propose(self, cache: MTPCache, hidden: Tensor, next_tokens: Tensor) -> Tensor:
        model, layers = self.model.model, self.model.model.mtp_layers
        cache.drop_drafts()
        first = layers[0].layer_idx
        positions = torch.arange(cache.num_verified, cache.num_verified + hidden.shape[0], device=hidden.device)
        h, token = hidden[None], next_tokens[None]
        drafts = []
        for step in range(self.k):
            layer = layers[step % len(layers)]
            cache.start(positions)
            h = layer(model.word_embeddings(token), h, model.rotary(positions[None]), cache)
            if step == 0:
                cache.num_verified += positions.shape[0]
                cache.verified[first] = cache.num_verified
            cache.verified.setdefault(layer.layer_idx, 0)
            h = h[:, -1:]
            logits = self.model.lm_head(layer.final_layernorm(h, self.policy))
            token = logits.argmax(-1)
            drafts.append(token[0, 0])
            positions = positions[-1:] + 1
        return torch.stack(drafts)
