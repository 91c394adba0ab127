"""The FP8 linear layer, forward and backward.

Forward: y = x wᵀ with x quantized per 1×128 and w per 128×128. Backward, as DeepSeek-V3: dgrad
dx = dy w with dy quantized per 1×128 along its channels and the weight's codes transposed (a
128×128 block transposes into one, so no requantization); wgrad dw = dyᵀ x with both operands
quantized per 1×128 along the tokens, the transposed quantization. x is kept in its own dtype for
the wgrad (not in e4m3: its transposed blocks are other blocks). Weights stored in e4m3 with their
scales (serving) multiply as they are.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..policy import KernelPolicy
from .gemm import fp8_gemm, quantize_blocks, quantize_rows
from .reference import E4M3


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, policy: KernelPolicy) -> Tensor:
        qx, sx = quantize_rows(x, policy)
        qw, sw = quantize_blocks(weight, policy)
        ctx.save_for_backward(x, qw, sw)
        ctx.policy, ctx.weight_dtype = policy, weight.dtype
        return fp8_gemm(qx, sx, qw, sw, x.dtype, policy)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, qw, sw = ctx.saved_tensors
        policy, dx, dw = ctx.policy, None, None
        dy = dy.contiguous()
        if ctx.needs_input_grad[0]:
            qdy, sdy = quantize_rows(dy, policy)
            dx = fp8_gemm(qdy, sdy, qw.t().contiguous(), sw.t().contiguous(), dy.dtype, policy)
        if ctx.needs_input_grad[1]:
            qdy_t, sdy_t = quantize_rows(dy.t(), policy)
            qx_t, sx_t = quantize_rows(x.t(), policy)
            dw = fp8_gemm(qdy_t, sdy_t, qx_t, sx_t, ctx.weight_dtype, policy)
        return dx, dw, None


def fp8_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, weight_scale: Tensor | None = None,
               *, policy: KernelPolicy) -> Tensor:
    """x [..., K] @ weightᵀ (+ bias) in blockwise FP8; weight [N, K] in any float dtype (quantized here,
    differentiable), or e4m3 codes with their 128×128 `weight_scale` [ceil(N/128), ceil(K/128)] (no
    gradient). The output has x's dtype."""
    rows = x.reshape(-1, x.shape[-1])
    if weight.dtype == E4M3:
        if weight_scale is None:
            raise ValueError("e4m3 weights need their weight_scale")
        qx, sx = quantize_rows(rows, policy)
        y = fp8_gemm(qx, sx, weight, weight_scale, x.dtype, policy)
    else:
        y = _FP8Linear.apply(rows, weight, policy)
    y = y.view(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias
