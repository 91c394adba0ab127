"""The report's analyses for any config: what a decode step reads (`memory`), FLOPs per token of
prefill and decode (`flops`), and the hybrid-ratio scaling sweep (`sweep`)."""

from __future__ import annotations

from ..config import RingLinearConfig

# 1K, 2K, ..., 1M tokens: the range of the report's Figure 4
CONTEXTS = tuple(2**k for k in range(10, 21))


def served(config: RingLinearConfig) -> RingLinearConfig:
    """The model inference runs: the MTP layers are trained but not run by the engine."""
    return config.replace(num_nextn_predict_layers=0)


def softmax_twin(config: RingLinearConfig) -> RingLinearConfig:
    """The same model with every layer softmax (GQA) attention: what the hybrid is measured against."""
    return config.replace(layer_group_size=1)


def check_contexts(contexts: list[int]) -> None:
    if not contexts or any(n < 1 for n in contexts):
        raise ValueError(f"invalid --contexts {contexts}: give one or more positive token counts")


def context_label(n: int) -> str:
    """1024 -> '1K', 2**20 -> '1M', other counts as they are."""
    return f"{n // 2**20}M" if n % 2**20 == 0 else f"{n // 1024}K" if n % 1024 == 0 else str(n)
