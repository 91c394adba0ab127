from .causal_lm import CausalLMOutput, RingLinearForCausalLM, RingLinearModel
from .context import AttentionContext, HybridCache, SequenceContext

__all__ = ["AttentionContext", "CausalLMOutput", "HybridCache", "RingLinearForCausalLM", "RingLinearModel",
           "SequenceContext"]
