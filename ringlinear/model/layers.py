"""Small building blocks: the linear layer (bf16 or blockwise FP8), RMSNorm (whole or grouped), partial
RoPE (NeoX halves or interleaved pairs; YaRN scaling) and the gated MLP (SwiGLU or PowLU)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..config import RingLinearConfig
from ..ops.fp8 import fp8_linear
from ..ops.fused import fused, glu
from ..ops.policy import KernelPolicy, rms_norm_kernel


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


def rms_norm_chain(x: Tensor, weight: Tensor, eps: float, groups: int = 1, gate: Tensor | None = None) -> Tensor:
    """`weight * x / rms(x)` over each of `groups` equal slices of the last dimension, the
    statistics in fp32 and the product in the input dtype (as HF); times `sigmoid(gate)` if given."""
    x32 = at_least_fp32(x).unflatten(-1, (groups, -1))
    normed = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2).to(x.dtype)
    return normed if gate is None else normed * torch.sigmoid(gate)


_rms_norm_fused = fused(rms_norm_chain)


def rms_norm(x: Tensor, weight: Tensor, eps: float, groups: int = 1, gate: Tensor | None = None, *,
             policy: KernelPolicy) -> Tensor:
    """`rms_norm_chain`, by the rule table: a compiled chain, the eager ops, or in invariant mode one
    Triton program per row."""
    if rms_norm_kernel(policy, x, weight) == "invariant_rows":
        from ..ops.invariant_kernels import rms_norm as rms_norm_rows
        return rms_norm_rows(x, weight, eps, groups, gate, rms_norm_chain)
    # the compiled chain sees rows [N, dim] whatever x's rank: one graph fewer per rank met (each variant
    # is a recompile, and past torch's recompile limit the chain runs eagerly)
    dim = x.shape[-1]
    gate_rows = None if gate is None else gate.reshape(-1, dim)
    return _rms_norm_fused(x.reshape(-1, dim), weight, eps, groups, gate_rows, policy=policy).view(x.shape)


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
    """RoPE tables for the first `rotary_dim` channels of each head (one table serves the Lightning
    and the full-attention layers, as in the published code); with YaRN (`rope_scaling`) the
    frequencies blend interpolation and extrapolation and cos, sin carry its attention factor."""

    def __init__(self, config: RingLinearConfig):
        super().__init__()
        self.rotary_dim, self.theta = config.rotary_dim, config.rope_theta
        self.scaling = config.rope_scaling
        self.max_positions = config.max_position_embeddings
        self.attention_factor = config.rope_attention_factor

    def inv_freq(self, device: torch.device) -> Tensor:
        dim = self.rotary_dim
        base = self.theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
        s = self.scaling
        if s is None or s.get("rope_type", s.get("type")) != "yarn":
            return 1.0 / base
        factor = s["factor"]
        original = s.get("original_max_position_embeddings") or self.max_positions

        def correction_dim(rotations: float) -> float:  # the dim whose wavelength fits `rotations` times
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(self.theta))

        low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
        if s.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        ramp = (torch.arange(dim // 2, device=device, dtype=torch.float32) - low) / max(high - low, 1e-3)
        extrapolate = 1 - ramp.clamp(0, 1)  # 1: keep the frequency (fast dims), 0: divide it by factor
        return (1 / (factor * base)) * (1 - extrapolate) + (1 / base) * extrapolate

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin of shape [*positions.shape, rotary_dim] in fp32."""
        angles = positions.float()[..., None] * self.inv_freq(positions.device)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


@fused
def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> Tensor:
    """x: [..., T, heads, D]; cos/sin: [..., T, rotary_dim] broadcast over heads. Computed in fp32.
    NeoX form (channel i pairs with i + rotary_dim/2); `interleaved`: channel 2i pairs with 2i + 1,
    computed as the published MLA code does it: the pairs are first gathered into halves, so the
    rotated channels come out in that order (q·k, all attention sees, is the same either way)."""
    rot = cos.shape[-1]
    x_rot, x_pass = at_least_fp32(x[..., :rot]), x[..., rot:]
    if interleaved:
        x_rot = x_rot.unflatten(-1, (rot // 2, 2)).transpose(-1, -2).flatten(-2)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    half = rot // 2
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    return torch.cat([(x_rot * cos + rotated * sin).to(x.dtype), x_pass], dim=-1)


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), act = SiLU (SwiGLU) or PowLU's gate (`hidden_act`)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str):
        super().__init__()
        self.activation = activation
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor, policy: KernelPolicy) -> Tensor:
        hidden = glu(self.gate_proj(x, policy), self.up_proj(x, policy), None, self.activation, policy=policy)
        return self.down_proj(hidden, policy)
