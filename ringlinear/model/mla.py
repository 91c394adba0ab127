"""Multi-head latent attention (DeepSeek-V2/V3 MLA), the full-attention layer of Ring-2.5 / Ling-2.6.

Per token the keys and values come from one normalised latent of `kv_lora_rank` channels plus one
rotated key of `qk_rope_head_dim` channels shared by all heads; `kv_b_proj` expands the latent to
each head's key part without position (`qk_nope_head_dim`) and its value (`v_head_dim`). A query
head is [nope | rope] as well. The layer hands the latent and the rope key to the context, which
keeps them (a cache stores those 576 values per token at the published shapes, not the heads)
and runs attention; `decompress` is the plain form every context can use.
Module names are the published checkpoint names (`attention.kv_a_proj_with_mqa`, ...).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..config import RingLinearConfig
from ..ops.policy import KernelPolicy
from .layers import Linear, RMSNorm, apply_rotary

if TYPE_CHECKING:
    from .context import AttentionContext


def decompress(latent: Tensor, k_rope: Tensor, kv_b: Tensor, num_heads: int, nope_dim: int) -> tuple[Tensor, Tensor]:
    """latent [B, T, r] (normalised), k_rope [B, T, rope] (rotated), kv_b [H·(nope + v), r] ->
    k [B, T, H, nope + rope], v [B, T, H, v]."""
    kv = (latent @ kv_b.t()).unflatten(-1, (num_heads, -1))
    k_nope, v = kv.split([nope_dim, kv.shape[-1] - nope_dim], dim=-1)
    k = torch.cat([k_nope, k_rope[:, :, None].expand(*k_nope.shape[:-1], -1)], dim=-1)
    return k, v


class MultiLatentAttention(nn.Module):
    """Causal MLA with a full-rank (`q_proj`) or low-rank (`q_a_proj` → norm → `q_b_proj`) query."""

    def __init__(self, config: RingLinearConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        H, hidden, eps = config.num_attention_heads, config.hidden_size, config.rms_norm_eps
        qk, r = config.qk_head_dim, config.kv_lora_rank
        if config.q_lora_rank is None:
            self.q_proj = Linear(hidden, H * qk, bias=False)
        else:
            self.q_a_proj = Linear(hidden, config.q_lora_rank, bias=config.use_qkv_bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, eps)
            self.q_b_proj = Linear(config.q_lora_rank, H * qk, bias=False)
        self.kv_a_proj_with_mqa = Linear(hidden, r + config.qk_rope_head_dim, bias=config.use_qkv_bias)
        self.kv_a_layernorm = RMSNorm(r, eps)
        # its weight is read by the attention itself (decompressed or absorbed), so it stays full precision
        self.kv_b_proj = nn.Linear(r, H * (config.qk_nope_head_dim + config.v_head_dim), bias=False)
        # the published file gives the output projection a bias by use_qkv_bias, not use_bias
        self.dense = Linear(H * config.v_head_dim, hidden, bias=config.use_qkv_bias)

    def query(self, x: Tensor, policy: KernelPolicy) -> Tensor:
        if self.config.q_lora_rank is None:
            return self.q_proj(x, policy)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x, policy), policy), policy)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], context: AttentionContext) -> Tensor:
        c, policy = self.config, context.policy
        B, T, _ = x.shape
        q = self.query(x, policy).view(B, T, c.num_attention_heads, c.qk_head_dim)
        q_nope, q_rope = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x, policy).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent, policy)
        q_rope = apply_rotary(q_rope, *rope, c.rope_interleave, policy=policy).to(q.dtype)
        k_rope = apply_rotary(k_rope[:, :, None], *rope, c.rope_interleave, policy=policy)[:, :, 0].to(q.dtype)
        o = context.latent_attention(self.layer_idx, torch.cat([q_nope, q_rope], dim=-1), latent, k_rope,
                                     self.kv_b_proj.weight, c.softmax_scale)
        return self.dense(o.reshape(B, T, -1), policy)
