"""ringlinear: hybrid linear-attention MoE language models of the Ring-linear family."""

from .config import RingLinearConfig
from .model import CausalLMOutput, HybridCache, RingLinearForCausalLM, SequenceContext
from .ops.policy import KernelPolicy

__version__ = "0.1.0"
__all__ = ["CausalLMOutput", "HybridCache", "KernelPolicy", "RingLinearConfig", "RingLinearForCausalLM",
           "SequenceContext"]
