"""FP8 weights for serving: the linear layers and routed experts stored in e4m3 with 128×128 scales.

The layout is the one vLLM and SGLang read for DeepSeek-style block FP8: each quantized
`...weight` is float8_e4m3fn beside a float32 `...weight_scale_inv` [ceil(N/128), ceil(K/128)] (the
dequantization factor: w ≈ weight · scale), experts one by one (`mlp.experts.{e}.gate_proj.weight`,
`....weight_scale_inv`), and config.json says so in `quantization_config`. Router, norms,
embeddings and the LM head stay in the model's dtype, as in DeepSeek-V3's checkpoints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import RingLinearConfig
from ..ops.fp8 import E4M3, quantize_blocks
from ..ops.policy import KernelPolicy
from .layers import Linear
from .moe import Experts

if TYPE_CHECKING:
    from .causal_lm import RingLinearForCausalLM

QUANTIZATION_CONFIG: dict[str, Any] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                       "weight_block_size": [128, 128]}
QUANTIZATIONS = ("none", "fp8")


def is_fp8_checkpoint(config: RingLinearConfig) -> bool:
    """Whether config.json declares block-FP8 weights; other quantization methods are refused."""
    quantization = config.extra.get("quantization_config")
    if quantization is None:
        return False
    if quantization.get("quant_method") != "fp8" or quantization.get("weight_block_size") != [128, 128]:
        raise ValueError(f"unsupported quantization_config {quantization}: this library reads block FP8 "
                         "(quant_method 'fp8', weight_block_size [128, 128])")
    return True


@torch.no_grad()
def quantize_weights(model: RingLinearForCausalLM, policy: KernelPolicy = KernelPolicy()) -> RingLinearForCausalLM:
    """Replace, in place, the weights of every linear layer and routed expert of the decoder (and MTP)
    layers by their e4m3 codes and register their scales; a model already in FP8 is returned as it is."""
    for module in model.model.layers.modules():
        if isinstance(module, Linear) and module.weight.dtype != E4M3:
            codes, scale = quantize_blocks(module.weight, policy)
            module.weight = nn.Parameter(codes, requires_grad=False)
            module.register_buffer("weight_scale_inv", scale)
        elif isinstance(module, Experts) and module.gate_proj.dtype != E4M3:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                pairs = [quantize_blocks(w, policy) for w in getattr(module, proj).unbind()]
                setattr(module, proj, nn.Parameter(torch.stack([q for q, _ in pairs]), requires_grad=False))
                module.register_buffer(f"{proj}_scale_inv", torch.stack([s for _, s in pairs]))
    model.config = model.config.replace(extra={**model.config.extra, "quantization_config": QUANTIZATION_CONFIG})
    return model
