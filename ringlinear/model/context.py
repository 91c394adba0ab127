"""Attention contexts: how the sequence-mixing core of every attention layer runs in one forward.

The layers own the math around it (projections, norms, RoPE, gates); a context decides which
positions the tokens have, what the attention sees besides them, and what is kept for later:

- `SequenceContext`: whole sequences, optionally several documents packed along T (training).
- `HybridCache`: B sequences advanced together (prefill, then decode), keeping per linear layer one
  fp32 state [B, H, D, D], per GQA layer the keys and values, per MLA layer the latents and rope keys.

Every context carries the run's `KernelPolicy` (`ops.policy`): which kernels its attention calls and
the layers' norms, MLPs and MoE run, and whether the forward is batch-invariant. The inference
engine supplies its own context (state slots, paged KV) with the same methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from ..config import RingLinearConfig
from ..ops import lightning_attn, lightning_decode
from ..ops.attention import causal_attention, document_ids
from ..ops.policy import KernelPolicy
from .mla import decompress


class AttentionContext(ABC):
    """Interface every context implements."""

    policy: KernelPolicy  # the kernels of this forward

    @abstractmethod
    def positions(self, batch: int, seq_len: int, device: torch.device) -> Tensor:
        """Rotary positions [B, T] of the tokens of this forward."""

    @abstractmethod
    def lightning(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor) -> Tensor:
        """q, k, v [B, T, H, D] -> o [B, T, H, D] (scale D^-½)."""

    @abstractmethod
    def softmax(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """q [B, T, H, D], k [B, T, KV, D], v [B, T, KV, Dv] -> o [B, T, H, Dv]."""

    def latent_attention(self, layer_idx: int, q: Tensor, latent: Tensor, k_rope: Tensor, kv_b: Tensor,
                         scale: float) -> Tensor:
        """MLA: q [B, T, H, nope + rope]; the new tokens' normalised latents [B, T, r] and rotated rope
        keys [B, T, rope]; kv_b the up-projection [H·(nope + v), r] -> o [B, T, H, v]. Here: the keys
        and values decompressed into heads, then `softmax`."""
        k, v = decompress(latent, k_rope, kv_b, q.shape[2], q.shape[-1] - k_rope.shape[-1])
        return self.softmax(layer_idx, q, k, v, scale)

    def advance(self, num_tokens: int) -> None:
        """Called once after all layers ran on `num_tokens` new tokens per sequence."""


class SequenceContext(AttentionContext):
    """Whole sequences from position 0. With `cu_seqlens` ([N+1] offsets, B = 1) the documents packed
    along T neither attend to each other nor share a Lightning state, and positions restart at 0."""

    def __init__(self, cu_seqlens: Tensor | None = None, policy: KernelPolicy = KernelPolicy()):
        self.cu_seqlens, self.policy = cu_seqlens, policy

    def document_ids(self, seq_len: int, device: torch.device) -> Tensor:
        if self.cu_seqlens is None:
            return torch.zeros(seq_len, dtype=torch.long, device=device)
        return document_ids(self.cu_seqlens.to(device), seq_len)

    def positions(self, batch: int, seq_len: int, device: torch.device) -> Tensor:
        positions = torch.arange(seq_len, device=device)
        if self.cu_seqlens is not None:
            cu = self.cu_seqlens.to(device)
            positions = positions - cu[self.document_ids(seq_len, device)]
        return positions.expand(batch, seq_len)

    def lightning(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor) -> Tensor:
        return lightning_attn(q, k, v, log_decay, cu_seqlens=self.cu_seqlens, policy=self.policy)[0]

    def softmax(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        return causal_attention(q, k, v, scale, cu_seqlens=self.cu_seqlens, policy=self.policy)


class HybridCache(AttentionContext):
    """Inference cache for B sequences of equal length, preallocated for `max_length` tokens."""

    def __init__(self, config: RingLinearConfig, batch_size: int, max_length: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 policy: KernelPolicy = KernelPolicy()):
        self.policy = policy
        H, KV, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.batch_size, self.max_length, self.length = batch_size, max_length, 0
        self.states: dict[int, Tensor] = {}
        self.keys: dict[int, Tensor] = {}  # GQA: keys; MLA: the latents [B, max_length, r]
        self.values: dict[int, Tensor] = {}  # GQA: values; MLA: the rope keys [B, max_length, rope]
        for i, kind in enumerate(config.layer_types):
            if kind == "linear":
                self.states[i] = torch.zeros(batch_size, H, D, D, device=device, dtype=torch.float32)
            elif config.attention_type == "mla":
                self.keys[i] = torch.zeros(batch_size, max_length, config.kv_lora_rank, device=device, dtype=dtype)
                self.values[i] = torch.zeros(batch_size, max_length, config.qk_rope_head_dim, device=device,
                                             dtype=dtype)
            else:
                self.keys[i] = torch.zeros(batch_size, max_length, KV, D, device=device, dtype=dtype)
                self.values[i] = torch.zeros_like(self.keys[i])
        self._slots = torch.arange(batch_size, device=device)

    def nbytes(self) -> int:
        tensors = [*self.states.values(), *self.keys.values(), *self.values.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def positions(self, batch: int, seq_len: int, device: torch.device) -> Tensor:
        if batch != self.batch_size:
            raise ValueError(f"cache holds {self.batch_size} sequences, got a batch of {batch}")
        if self.length + seq_len > self.max_length:
            raise ValueError(f"cache is full: {self.length} + {seq_len} tokens exceed max_length="
                             f"{self.max_length}")
        positions = torch.arange(self.length, self.length + seq_len, device=device)
        return positions.expand(batch, seq_len)

    def lightning(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor) -> Tensor:
        state = self.states[layer_idx]
        if q.shape[1] == 1:
            return lightning_decode(q[:, 0], k[:, 0], v[:, 0], log_decay, state, self._slots,
                                    policy=self.policy)[:, None]
        o, final = lightning_attn(q, k, v, log_decay, initial_state=state, output_final_state=True,
                                  policy=self.policy)
        state.copy_(final)
        return o

    def softmax(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        end = self.length + q.shape[1]
        self.keys[layer_idx][:, self.length:end] = k
        self.values[layer_idx][:, self.length:end] = v
        return causal_attention(q, self.keys[layer_idx][:, :end], self.values[layer_idx][:, :end], scale,
                                policy=self.policy)

    def latent_attention(self, layer_idx: int, q: Tensor, latent: Tensor, k_rope: Tensor, kv_b: Tensor,
                         scale: float) -> Tensor:
        end = self.length + q.shape[1]
        self.keys[layer_idx][:, self.length:end] = latent
        self.values[layer_idx][:, self.length:end] = k_rope
        k, v = decompress(self.keys[layer_idx][:, :end], self.values[layer_idx][:, :end], kv_b, q.shape[2],
                          q.shape[-1] - k_rope.shape[-1])
        return causal_attention(q, k, v, scale, policy=self.policy)

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens
