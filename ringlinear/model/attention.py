"""The two token mixers of the hybrid stack: Lightning (linear) attention and softmax GQA attention.

Both read a fused `query_key_value` projection, normalise q and k per head (QK-norm, before RoPE),
rotate the first `rotary_dim` channels (NeoX RoPE), and hand q, k, v to the attention context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import RingLinearConfig, lightning_log_decay
from ..ops.policy import KernelPolicy
from .context import AttentionContext
from .layers import Linear, RMSNorm, apply_rotary


class _QKNorm(nn.Module):
    def __init__(self, config: RingLinearConfig):
        super().__init__()
        if config.use_qk_norm:
            self.query_layernorm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.key_layernorm = RMSNorm(config.head_dim, config.rms_norm_eps)

    def norm_and_rotate(self, q: Tensor, k: Tensor, rope: tuple[Tensor, Tensor],
                        policy: KernelPolicy) -> tuple[Tensor, Tensor]:
        dtype = q.dtype  # under autocast fp32 norm weights would promote q and k away from v's dtype
        if hasattr(self, "query_layernorm"):
            q, k = self.query_layernorm(q, policy), self.key_layernorm(k, policy)
        return apply_rotary(q, *rope, policy=policy).to(dtype), apply_rotary(k, *rope, policy=policy).to(dtype)


class LightningAttention(_QKNorm):
    """MHA linear attention with a fixed per-head decay; output = dense(groupnorm(o) * sigmoid(g))."""

    def __init__(self, config: RingLinearConfig, layer_idx: int):
        super().__init__(config)
        self.config, self.layer_idx = config, layer_idx
        H, D, hidden = config.num_attention_heads, config.head_dim, config.hidden_size
        self.query_key_value = Linear(hidden, 3 * H * D, bias=config.use_qkv_bias)
        self.g_proj = Linear(hidden, H * D, bias=False)
        self.g_norm = RMSNorm(H * D, config.rms_norm_eps, groups=config.group_norm_size)
        self.dense = Linear(H * D, hidden, bias=config.use_bias)
        self._log_decay: Tensor | None = None  # built on first use so meta-device init stays cheap

    def log_decay(self, device: torch.device) -> Tensor:
        """log λ per head in fp32; never a parameter, so no dtype cast can round it."""
        if self._log_decay is None or self._log_decay.device != device:
            values = lightning_log_decay(self.config, self.layer_idx)
            self._log_decay = torch.tensor(values, dtype=torch.float32, device=device)
        return self._log_decay

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], context: AttentionContext) -> Tensor:
        B, T, _ = x.shape
        H, D = self.config.num_attention_heads, self.config.head_dim
        qkv = self.query_key_value(x, context.policy)
        if self.config.linear_silu:
            qkv = F.silu(qkv)
        q, k, v = qkv.view(B, T, 3, H, D).unbind(2)  # layout [all q heads | all k heads | all v heads]
        q, k = self.norm_and_rotate(q, k, rope, context.policy)
        o = context.lightning(self.layer_idx, q, k, v.contiguous(), self.log_decay(x.device))
        policy = context.policy
        return self.dense(self.g_norm(o.reshape(B, T, H * D), policy, gate=self.g_proj(x, policy)), policy)


class SoftmaxAttention(_QKNorm):
    """Causal grouped-query softmax attention."""

    def __init__(self, config: RingLinearConfig, layer_idx: int):
        super().__init__(config)
        self.config, self.layer_idx = config, layer_idx
        H, KV, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.query_key_value = Linear(config.hidden_size, (H + 2 * KV) * D, bias=config.use_qkv_bias)
        self.dense = Linear(H * D, config.hidden_size, bias=config.use_bias)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], context: AttentionContext) -> Tensor:
        B, T, _ = x.shape
        H, KV, D = self.config.num_attention_heads, self.config.num_key_value_heads, self.config.head_dim
        q, k, v = self.query_key_value(x, context.policy).view(B, T, H + 2 * KV, D).split([H, KV, KV], dim=2)
        q, k = self.norm_and_rotate(q, k, rope, context.policy)
        o = context.softmax(self.layer_idx, q, k, v, D**-0.5)
        return self.dense(o.reshape(B, T, H * D), context.policy)
