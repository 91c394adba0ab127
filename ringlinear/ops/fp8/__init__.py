"""Blockwise FP8 (DeepSeek-V3 / linghe): quantization, the GEMM, and the linear layer and experts
built on them. `reference.py` defines the numbers; `kernels.py` computes them on Triton."""

from .gemm import expert_schedule, fp8_gemm, fp8_grouped_gemm, quantize_blocks, quantize_rows
from .linear import fp8_linear
from .reference import BLOCK, E4M3, dequantize

__all__ = ["BLOCK", "E4M3", "dequantize", "expert_schedule", "fp8_gemm", "fp8_grouped_gemm", "fp8_linear",
           "quantize_blocks", "quantize_rows"]
