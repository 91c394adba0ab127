"""Small building blocks: the linear layer, RMSNorm (whole or grouped), partial NeoX RoPE and the SwiGLU MLP."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.fp8 import fp8_linear
from ..ops.fused import fused, swiglu
from ..ops.policy import KernelPolicy


def at_least_fp32(x: Tensor) -> Tensor:
    """x in fp32, or kept in fp64: reductions and routing never run in half precision."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class Linear(nn.Linear):
    """nn.Linear that takes the kernel policy: its product is blockwise FP8 under `policy.fp8`, or when its
    weight is stored in e4m3 beside a `weight_scale_inv` buffer (`model.fp8.quantize_weights`)."""

    def forward(self, x: Tensor, policy: KernelPolicy) -> Tensor:
        scale = self._buffers.get("weight_scale_inv")
        if policy.fp8 or scale is not None:
            return fp8_linear(x, self.weight, self.bias, scale, policy=policy)
        return super().forward(x)


@fused
def rms_norm(x: Tensor, weight: Tensor, eps: float, groups: int = 1, gate: Tensor | None = None) -> Tensor:
    """`weight * x / rms(x)` over each of `groups` equal slices of the last dimension, the
    statistics in fp32 and the product in the input dtype (as HF); times `sigmoid(gate)` if given."""
    x32 = at_least_fp32(x).unflatten(-1, (groups, -1))
    normed = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2).to(x.dtype)
    return normed if gate is None else normed * torch.sigmoid(gate)


class RMSNorm(nn.Module):
    """`rms_norm` with a learned weight: over the whole last dimension, or separately over `groups`
    equal slices of it (the Lightning output's group norm), optionally gated by `sigmoid(gate)`."""

    def __init__(self, dim: int, eps: float = 1e-6, groups: int = 1):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, policy: KernelPolicy, gate: Tensor | None = None) -> Tensor:
        return rms_norm(x, self.weight, self.eps, self.groups, gate, policy=policy)


class RotaryEmbedding(nn.Module):
    """NeoX-style RoPE on the first `rotary_dim` channels of each head; the rest pass through."""

    def __init__(self, rotary_dim: int, theta: float):
        super().__init__()
        self.rotary_dim, self.theta = rotary_dim, theta

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin of shape [*positions.shape, rotary_dim] in fp32."""
        exponent = torch.arange(0, self.rotary_dim, 2, device=positions.device, dtype=torch.float32)
        inv_freq = 1.0 / self.theta ** (exponent / self.rotary_dim)
        angles = positions.float()[..., None] * inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()


@fused
def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [..., T, heads, D]; cos/sin: [..., T, rotary_dim] broadcast over heads. Computed in fp32."""
    rot = cos.shape[-1]
    x_rot, x_pass = at_least_fp32(x[..., :rot]), x[..., rot:]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    half = rot // 2
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    return torch.cat([(x_rot * cos + rotated * sin).to(x.dtype), x_pass], dim=-1)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor, policy: KernelPolicy) -> Tensor:
        return self.down_proj(swiglu(self.gate_proj(x, policy), self.up_proj(x, policy), policy=policy), policy)
