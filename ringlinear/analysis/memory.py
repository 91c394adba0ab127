"""Bytes one decode step reads and writes per generated token, by context length (the report's
Figure 4, with the weights included): at batch B a step reads the weights it touches once for
all B sequences, each sequence's KV pages, and each sequence's Lightning states (read and written).

Weights and KV in bf16, Lightning states in fp32, as the engine keeps them on a GPU. The routed
experts a step touches are the expected number of distinct experts when each of the B tokens picks
its k of E uniformly: E·(1 − (1 − k/E)^B) per MoE layer (real routers are less uniform, so fewer).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..config import RingLinearConfig
from ..info import format_bytes, model_info
from ..model import RingLinearForCausalLM
from . import context_label, served, softmax_twin
from .plot import Line, save_plot

WEIGHT_BYTES = 2  # bf16


@dataclass(frozen=True)
class DecodeWeights:
    """Parameters a decode step reads, by how they scale with the batch."""

    always: int  # read once per step: attention, dense MLPs, shared experts, routers, norms, LM head
    per_expert: int  # one routed expert of one MoE layer
    moe_layers: int
    embedding_row: int  # read once per sequence: its token's row of the input embedding


def decode_weights(config: RingLinearConfig) -> DecodeWeights:
    config = served(config)
    with torch.device("meta"):
        model = RingLinearForCausalLM(config)
    experts = sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
    embedding = model.model.word_embeddings.weight
    always = sum(p.numel() for p in model.parameters() if p is not embedding) - experts
    if config.tie_word_embeddings:  # the LM head reads the whole matrix anyway
        always += embedding.numel()
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    per_expert = experts // (config.num_experts * moe_layers) if moe_layers else 0
    return DecodeWeights(always, per_expert, moe_layers, config.hidden_size)


def expected_experts(num_experts: int, top_k: int, batch: int) -> float:
    """Distinct experts of one layer that B tokens touch, each picking k of E uniformly."""
    return num_experts * (1 - (1 - top_k / num_experts) ** batch)


@dataclass(frozen=True)
class DecodeBytes:
    """Bytes per generated token of one decode step at `context` tokens, batch `batch`."""

    context: int
    batch: int
    weights: float  # the step's weight reads shared by its batch
    kv: float  # KV pages read (whole pages) and the new token's keys and values written
    state: float  # Lightning states read and written

    @property
    def total(self) -> float:
        return self.weights + self.kv + self.state

    def to_json(self) -> dict:
        return {**asdict(self), "total": self.total}


def decode_bytes(config: RingLinearConfig, contexts: list[int], batch: int, page_size: int) -> list[DecodeBytes]:
    """Per context length, what a step of `batch` sequences at that context moves per token."""
    if batch < 1:
        raise ValueError(f"invalid --batch {batch}: must be >= 1")
    if page_size < 1:
        raise ValueError(f"invalid --page-size {page_size}: must be >= 1")
    config = served(config)
    w, info = decode_weights(config), model_info(config)
    experts = expected_experts(config.num_experts, config.num_experts_per_tok, batch)
    step_params = w.always + w.moe_layers * experts * w.per_expert + batch * w.embedding_row
    weights = step_params * WEIGHT_BYTES / batch
    return [DecodeBytes(n, batch, weights, info.kv_bytes_per_token * (math.ceil(n / page_size) * page_size + 1),
                        2 * info.state_bytes_per_sequence) for n in contexts]


def report(config: RingLinearConfig, contexts: list[int], batch: int, page_size: int) -> dict:
    """The config's decode bytes and its all-softmax twin's, JSON-ready."""
    twin = softmax_twin(config)
    return {"layers": model_info(served(config)).layer_map, "batch": batch, "page_size": page_size,
            "hybrid": [r.to_json() for r in decode_bytes(config, contexts, batch, page_size)],
            "softmax": [r.to_json() for r in decode_bytes(twin, contexts, batch, page_size)]}


def table(result: dict) -> str:
    hybrid, softmax = result["hybrid"], result["softmax"]
    heading = (f"bytes read and written per generated token, decode at batch {result['batch']} "
               f"({result['page_size']}-token KV pages; bf16 weights and KV, fp32 Lightning states)")
    weights = (f"weights touched per token: hybrid {format_bytes(hybrid[0]['weights'])} ({result['layers']}), "
               f"all-softmax {format_bytes(softmax[0]['weights'])}; Lightning states "
               f"{format_bytes(hybrid[0]['state'])} per token")
    columns = (f"{'context':>8} | {'hybrid KV':>10} {'+ states':>10} {'total':>10} | {'softmax KV':>10} "
               f"{'total':>10} | {'KV+state ratio':>14} {'total ratio':>11}")
    lines = [heading, weights, columns]
    for h, s in zip(hybrid, softmax):
        cache = h["kv"] + h["state"]
        lines.append(f"{context_label(h['context']):>8} | {format_bytes(h['kv']):>10} {format_bytes(h['state']):>10} "
                     f"{format_bytes(h['total']):>10} | {format_bytes(s['kv']):>10} {format_bytes(s['total']):>10} | "
                     f"{(s['kv'] + s['state']) / cache:>13.2f}x {s['total'] / h['total']:>10.2f}x")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    lines = []
    for name, rows, color in (("hybrid", result["hybrid"], "C0"), ("all-softmax", result["softmax"], "C3")):
        x = [r["context"] for r in rows]
        lines.append(Line(f"{name}: total", x, [r["total"] for r in rows], "-", color))
        lines.append(Line(f"{name}: KV + states only", x, [r["kv"] + r["state"] for r in rows], "--", color))
    save_plot(path, lines, "context (tokens)", "bytes per generated token",
              f"decode memory access, batch {result['batch']} ({result['layers']})")
