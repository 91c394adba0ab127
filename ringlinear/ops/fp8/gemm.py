"""The dispatchers of blockwise FP8: quantize, the GEMM and the GEMM grouped by expert, each on the form
the kernel policy picks (`ops.policy.fp8_quantize_triton`, `fp8_gemm_kernel`, `fp8_grouped_gemm_kernel`)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..policy import KernelPolicy, fp8_gemm_kernel, fp8_grouped_gemm_kernel, fp8_quantize_triton
from .reference import (
    BLOCK,
    gemm_reference,
    quantize_blocks_reference,
    quantize_rows_reference,
)


def quantize_rows(x: Tensor, policy: KernelPolicy) -> tuple[Tensor, Tensor]:
    """x [M, K] (a transposed view is read as it is) -> e4m3 codes [M, K] and 1×128 scales [M, ceil(K/128)]."""
    if fp8_quantize_triton(policy, x):
        from .kernels import quantize_triton
        return quantize_triton(x, square=False)
    return quantize_rows_reference(x)


def quantize_blocks(w: Tensor, policy: KernelPolicy) -> tuple[Tensor, Tensor]:
    """w [N, K] -> e4m3 codes [N, K] and 128×128 scales [ceil(N/128), ceil(K/128)]."""
    if fp8_quantize_triton(policy, w):
        from .kernels import quantize_triton
        return quantize_triton(w, square=True)
    return quantize_blocks_reference(w)


def fp8_gemm(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, out_dtype: torch.dtype,
             policy: KernelPolicy) -> Tensor:
    """a @ bᵀ in fp32 from e4m3 a [M, K] (1×128 scales [M, ·]) and b [N, K] (1×128 scales [N, ·] or
    128×128 scales [ceil(N/128), ·]), rounded to `out_dtype`."""
    match fp8_gemm_kernel(policy, a, b):
        case "scaled_mm":
            return scaled_mm_blockwise(a, a_scale, b, b_scale, out_dtype)
        case "triton":
            from .kernels import gemm_triton
            return gemm_triton(a, a_scale, b, b_scale, out_dtype)
        case "reference":
            return gemm_reference(a, a_scale, b, b_scale, out_dtype)


def expert_schedule(a: Tensor, counts: Tensor, policy: KernelPolicy) -> Tensor | None:
    """The row-tile schedule `fp8_grouped_gemm`'s kernel takes for rows a [M, ·] in groups of `counts`, made
    once for all the products over the same rows (None where the reference runs)."""
    if fp8_grouped_gemm_kernel(policy, a) != "triton":
        return None
    from ..moe_kernels import schedule_tiles
    return schedule_tiles(counts, a.shape[0])


def fp8_grouped_gemm(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, counts: Tensor, out_dtype: torch.dtype,
                     policy: KernelPolicy, schedule: Tensor | None = None) -> Tensor:
    """Each expert's rows times its weights: e4m3 a [M, K] (1×128 scales [M, ·]) sorted by expert, counts[e]
    rows for expert e (counts [E] on the device), and e4m3 b [E, N, K] (128×128 scales [E, ceil(N/128), ·])
    -> [M, N] in `out_dtype`, a @ b[e]ᵀ in fp32 over expert e's rows. The Triton kernel never reads the
    counts on the host (`schedule`: `expert_schedule`'s for these rows, else made here); the reference
    loops over the experts."""
    match fp8_grouped_gemm_kernel(policy, a):
        case "triton":
            from .kernels import grouped_gemm_triton
            return grouped_gemm_triton(a, a_scale, b, b_scale, counts, out_dtype, schedule)
        case "reference":
            sizes = counts.tolist()
            return torch.cat([gemm_reference(a_e, s_e, b_e, bs_e, out_dtype) for a_e, s_e, b_e, bs_e
                              in zip(a.split(sizes), a_scale.split(sizes), b.unbind(), b_scale.unbind())])


def scaled_mm_blockwise(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """torch._scaled_mm with cuBLAS's blockwise recipes (1×128 · 128×128 and 1×128 · 1×128; dimensions
    M and N multiples of 128, K of 512: on PyTorch 2.11 with CUDA 13 the 128×128 recipe with 2 or 3 K
    blocks raises for scales padded to 4 and computes wrong numbers for unpadded ones). cuBLAS wants b
    column-major and the scales outer-dimension-major: 1×128 scales with the rows contiguous, 128×128 scales
    with the K blocks contiguous."""
    if a.shape[1] % 512:
        raise ValueError(f"scaled_mm_blockwise needs K a multiple of 512, got {a.shape[1]}")
    scale_a = a_scale.t().contiguous().t()
    scale_b = b_scale.t().contiguous() if b_scale.shape[0] == b.shape[0] else b_scale.t()  # 1×128: [K/128, N]
    return torch._scaled_mm(a, b.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)


def probe_scaled_mm(device: torch.device) -> bool:
    """Both recipes of `scaled_mm_blockwise` on random operands match the reference (bf16 rounding apart)."""
    g = torch.Generator(device).manual_seed(0)
    x, w = (torch.randn(2 * BLOCK, 4 * BLOCK, device=device, generator=g) for _ in range(2))
    qx, sx = quantize_rows_reference(x)
    for qw, sw in (quantize_blocks_reference(w), quantize_rows_reference(w)):
        want = gemm_reference(qx, sx, qw, sw, torch.float32)
        got = scaled_mm_blockwise(qx, sx, qw, sw, torch.bfloat16).float()
        if not torch.allclose(got, want, rtol=2e-2, atol=1e-1):
            return False
    return True
