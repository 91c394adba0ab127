"""What a run reports: model FLOPs and MFU, memory, loss spikes, expert load, and the metrics log
(JSON lines, and TensorBoard event files when asked)."""

from __future__ import annotations

import json
import math
import resource
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..config import RingLinearConfig
from ..info import model_info

# Dense bf16 tensor-core peaks (TFLOP/s), by a word of the device name.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "B200": 2250.0}
LIGHTNING_CHUNK = 64  # block size of the Lightning kernels: their intra-chunk work grows with it


class FlopCounter:
    """Model FLOPs of forward + backward (3 × forward) over packed documents: 2 per active
    non-embedding parameter per token (the routed experts a token uses, not all), the LM head once
    per prediction depth, softmax attention over each document's causal triangle (QKᵀ and PV:
    (Dqk + Dv)·H·n(n+1) for n tokens; Dqk = Dv = D for GQA, [nope | rope] and v for MLA in its
    decompressed form) and Lightning's chunked form, (4·C·D + 4·D²)·H per token (intra-chunk
    QKᵀ and PV, then q·S and the state update). Recomputation is not counted. The same count gives
    inference: `forward` for a prefill, `decode` for one generated token."""

    def __init__(self, config: RingLinearConfig):
        info = model_info(config)
        H, D = config.num_attention_heads, config.head_dim
        kinds = [config.is_softmax_layer(i) for i in range(config.num_hidden_layers + config.num_nextn_predict_layers)]
        self.lm_head = 2 * config.hidden_size * config.vocab_size * (1 + config.num_nextn_predict_layers)
        # per token in either form: the matmuls of the active weights, Lightning's q·S and state update
        self.body = 2 * (info.active_params - info.embedding_params) + kinds.count(False) * 4 * D * D * H
        self.chunk = kinds.count(False) * 4 * LIGHTNING_CHUNK * D * H  # per token of the chunked form only
        value_dim = config.v_head_dim if config.attention_type == "mla" else D
        self.per_pair = kinds.count(True) * (config.qk_head_dim + value_dim) * H

    def forward(self, document_lengths: Sequence[int], every_logit: bool = True) -> float:
        """Forward FLOPs; `every_logit=False` runs the LM head on each document's last token only, as
        a prefill does."""
        tokens = sum(document_lengths)
        heads = tokens if every_logit else len(document_lengths)
        pairs = sum(n * (n + 1) for n in document_lengths)
        return float((self.body + self.chunk) * tokens + self.lm_head * heads + self.per_pair * pairs)

    def decode(self, context: int) -> float:
        """Forward FLOPs of one token decoded at `context` tokens (itself included): the recurrent
        form of Lightning, no chunk; softmax attention over `context` keys."""
        return float(self.body + self.lm_head + 2 * self.per_pair * context)

    def __call__(self, document_lengths: Sequence[int]) -> float:
        return 3.0 * self.forward(document_lengths)


def peak_flops(tflops: float, device: torch.device) -> float | None:
    """FLOP/s of one device: given, or known for the GPU; None on a CPU (no MFU)."""
    if tflops:
        return tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak * 1e12 for word, peak in PEAK_TFLOPS.items() if word in name), None)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: allocated on its GPU since the last call; resident, over its
    lifetime, on a CPU."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def expert_load_stats(loads: Tensor, layers: Sequence[int]) -> dict[str, dict[str, float]]:
    """Per MoE layer: max violation (max load / mean load − 1, 0 = perfectly balanced) and the
    fraction of the tokens' expert slots taken by the least and the most loaded expert."""
    stats: dict[str, dict[str, float]] = {"max_violation": {}, "min_share": {}, "max_share": {}}
    for layer, load in zip(layers, loads.double()):
        total = load.sum().clamp_min(1)
        stats["max_violation"][str(layer)] = float(load.max() / load.mean().clamp_min(1e-12) - 1)
        stats["min_share"][str(layer)] = float(load.min() / total)
        stats["max_share"][str(layer)] = float(load.max() / total)
    return stats


class SpikeDetector:
    """A loss more than `sigmas` standard deviations above the mean of the last `window` losses."""

    def __init__(self, sigmas: float, window: int = 50, history: Sequence[float] = ()):
        self.sigmas, self.window, self.history = sigmas, window, list(history)

    def __call__(self, loss: float) -> float | None:
        """The loss's distance from the recent mean in standard deviations if it is a spike."""
        recent = self.history[-self.window:]
        self.history = recent + [loss]
        if len(recent) < 10:
            return None
        mean = sum(recent) / len(recent)
        std = math.sqrt(sum((x - mean) ** 2 for x in recent) / len(recent))
        score = (loss - mean) / max(std, 1e-8)
        return score if score > self.sigmas else None


class MetricsLog:
    """metrics.jsonl (one JSON object per line) and TensorBoard scalars, written by the main process."""

    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool):
        self.enabled = enabled
        self.file = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when used
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, **metrics) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for name, value in _flatten(metrics):
                self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def _flatten(metrics: dict, prefix: str = ""):
    for key, value in metrics.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield prefix + key, value
