"""Blockwise FP8 (DeepSeek-V3 / linghe recipe) in plain PyTorch: the readable form of every kernel.

Values are e4m3 (`torch.float8_e4m3fn`, largest 448) with one fp32 scale per block:
- activations and gradients: 1×128 blocks, i.e. per row and per 128 consecutive channels of the
  contraction dimension ("rows" below: x [M, K] -> scales [M, ceil(K/128)]);
- weights: 128×128 blocks (w [N, K] -> scales [ceil(N/128), ceil(K/128)]).
A partial last block takes the amax of the elements it has.

scale = amax(|block|) / 448 in fp32, q = e4m3(clamp(x / scale, ±448)) rounded to nearest even, and
x ≈ q · scale: the scale is the dequantization factor, vLLM's `weight_scale_inv`. A block of zeros
(or one whose amax/448 underflows fp32) gets scale 1, as Transformer Engine does, so its codes are 0
and no scale is zero or subnormal. The clamp is the saturation: x / scale rounds to at most
448·(1 + 2⁻²⁴), which the cast would otherwise turn into NaN on some devices.

The backward needs the transposed operands quantized along the other dimension (wgrad contracts over
tokens): `quantize_rows(x.t())`, which the Triton kernel produces from x without a transposed copy.
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK = 128
E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


def blocks(n: int) -> int:
    return -(-n // BLOCK)


def scale_of(amax: Tensor) -> Tensor:
    """Dequantization scale of blocks with this fp32 amax: amax/448, or 1 where that is 0. Divisions here
    run in fp64 and round once to fp32, which is IEEE fp32 division on every device (CUDA PyTorch divides
    by a Python scalar as a product with its reciprocal, one ulp off at times)."""
    scale = (amax.double() / E4M3_MAX).float()
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def to_e4m3(x: Tensor, scale: Tensor) -> Tensor:
    """x / scale (fp32, scale broadcast to x's shape) saturated and rounded to e4m3."""
    return (x.double() / scale.double()).float().clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def _pad_to_blocks(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    pad = []
    for d in reversed(range(x.dim())):
        pad += [0, -x.shape[d] % BLOCK if d in dims else 0]
    return torch.nn.functional.pad(x, pad)


def quantize_rows_reference(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (q [M, K] e4m3, scales [M, ceil(K/128)] fp32): 1×128 blocks."""
    M, K = x.shape
    padded = _pad_to_blocks(x.float(), (1,)).view(M, -1, BLOCK)
    scale = scale_of(padded.abs().amax(-1))
    q = to_e4m3(padded, scale[..., None]).view(M, -1)[:, :K]
    return q, scale


def quantize_blocks_reference(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [N, K] -> (q [N, K] e4m3, scales [ceil(N/128), ceil(K/128)] fp32): 128×128 blocks."""
    N, K = w.shape
    padded = _pad_to_blocks(w.float(), (0, 1))
    tiles = padded.view(blocks(N), BLOCK, blocks(K), BLOCK)
    scale = scale_of(tiles.abs().amax(dim=(1, 3)))
    q = to_e4m3(tiles, scale[:, None, :, None]).view(padded.shape)[:N, :K]
    return q, scale


def expand_scales(scale: Tensor, shape: torch.Size, rows_per_scale: int) -> Tensor:
    """Scales [ceil(M/r), ceil(K/128)] repeated to one per element of a [M, K] tensor (r = 1 or 128)."""
    M, K = shape
    return scale.repeat_interleave(rows_per_scale, 0)[:M].repeat_interleave(BLOCK, 1)[:, :K]


def dequantize(q: Tensor, scale: Tensor) -> Tensor:
    """fp32 values of e4m3 codes q [M, K] with 1×128 scales ([M, ·]) or 128×128 scales ([ceil(M/128), ·])."""
    rows_per_scale = 1 if scale.shape[0] == q.shape[0] else BLOCK
    return q.float() * expand_scales(scale, q.shape, rows_per_scale)


def gemm_reference(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """a @ bᵀ of two quantized operands, a [M, K] with 1×128 scales, b [N, K] with 1×128 or 128×128
    scales: dequantized to fp32 and multiplied in fp32."""
    return (dequantize(a, a_scale) @ dequantize(b, b_scale).t()).to(out_dtype)
