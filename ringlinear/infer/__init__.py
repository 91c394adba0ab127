"""Inference: a continuous-batching engine over a hybrid cache, an offline API and an
OpenAI-compatible server (`ringlinear.infer.server`, imported on its own: it needs FastAPI)."""

from .engine import Engine, EngineConfig
from .llm import LLM
from .outputs import Completion, RequestOutput, TokenLogprob
from .params import InvalidRequest, SamplingParams

__all__ = ["LLM", "Completion", "Engine", "EngineConfig", "InvalidRequest", "RequestOutput", "SamplingParams",
           "TokenLogprob"]
