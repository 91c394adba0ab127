"""FLOPs per token of prefill and decode by context length, from the trainer's `FlopCounter` (one
count for training, prefill and decode), the context from which the hybrid costs less than its
all-softmax twin, and measured prefill seconds per token on the local device."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..config import RingLinearConfig
from ..model import RingLinearForCausalLM, SequenceContext
from ..ops.policy import KernelPolicy
from ..train.metrics import FlopCounter
from . import context_label, served, softmax_twin
from .plot import Line, save_plot


@dataclass(frozen=True)
class TokenFlops:
    context: int
    prefill: float  # per token of a prefill of `context` tokens (logits of the last one only)
    decode: float  # of the token decoded at `context` tokens


def token_flops(config: RingLinearConfig, contexts: list[int]) -> list[TokenFlops]:
    count = FlopCounter(served(config))
    return [TokenFlops(n, count.forward([n], every_logit=False) / n, count.decode(n)) for n in contexts]


def first_context_below(cost: Callable[[int], float], baseline: Callable[[int], float]) -> int | None:
    """The least context n ≥ 1 with cost(n) < baseline(n), for costs affine in n (as the
    per-token FLOPs of prefill and decode are); None if there is none."""
    gap0, slope = cost(1) - baseline(1), (cost(2) - baseline(2)) - (cost(1) - baseline(1))
    if gap0 < 0:
        return 1
    if slope >= 0:
        return None
    return 1 + math.floor(gap0 / -slope) + 1  # the gap at 1 + m is gap0 + m·slope: first m with it < 0


def crossovers(config: RingLinearConfig, twin: RingLinearConfig) -> dict[str, int | None]:
    """Contexts from which the hybrid's prefill (per token) and decode cost fewer FLOPs than the twin's."""
    ours, theirs = FlopCounter(served(config)), FlopCounter(served(twin))
    return {
        "prefill": first_context_below(lambda n: ours.forward([n], every_logit=False) / n,
                                       lambda n: theirs.forward([n], every_logit=False) / n),
        "decode": first_context_below(ours.decode, theirs.decode),
    }


@torch.no_grad()
def prefill_seconds(config: RingLinearConfig, contexts: list[int], device: torch.device, repeats: int = 3,
                    seed: int = 0) -> list[float]:
    """Seconds per token of a batch-1 prefill of each context (random weights in the config's dtype on
    a GPU, fp32 on a CPU; the fastest of `repeats` after one warm-up)."""
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = RingLinearForCausalLM(served(config)).to(device, dtype).eval()
    policy = KernelPolicy().resolve(device)
    seconds = []
    for n in contexts:
        ids = torch.randint(0, config.vocab_size, (1, n), device=device)
        times = []
        for _ in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            model(ids, context=SequenceContext(policy=policy), logits_to_keep=1)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        seconds.append(min(times[1:]) / n)
    return seconds


def report(config: RingLinearConfig, contexts: list[int], measure_device: torch.device | None = None,
           measure_max: int = 0) -> dict:
    """FLOPs of the config and its twin, JSON-ready; with `measure_device`, the measured prefill seconds
    per token of both at the contexts up to `measure_max`."""
    twin = softmax_twin(config)
    result = {"hybrid": [asdict(r) for r in token_flops(config, contexts)],
              "softmax": [asdict(r) for r in token_flops(twin, contexts)], "crossover": crossovers(config, twin)}
    if measure_device is not None:
        measured = [n for n in contexts if n <= measure_max]
        if not measured:
            raise ValueError(f"--measure-max {measure_max} is below every context of --contexts")
        for name, c in (("hybrid", config), ("softmax", twin)):
            for row, seconds in zip(result[name], prefill_seconds(c, measured, measure_device)):
                row["prefill_seconds"] = seconds
        faster = [h["context"] for h, s in zip(result["hybrid"], result["softmax"])
                  if "prefill_seconds" in h and h["prefill_seconds"] < s["prefill_seconds"]]
        result["crossover"]["measured_prefill"] = faster[0] if faster else None
        result["device"] = str(measure_device)
    return result


def _flops(n: float) -> str:
    return f"{n / 1e9:.3f}G" if n >= 1e8 else f"{n / 1e6:.3f}M"


def table(result: dict) -> str:
    measured = "device" in result
    lines = ["FLOPs per token (forward): prefill of a whole context (LM head on its last token), decode at it",
             f"{'context':>8} | {'prefill hybrid':>14} {'softmax':>10} | {'decode hybrid':>13} {'softmax':>10}"
             + (f" | {'prefill s/token hybrid':>22} {'softmax':>10}" if measured else "")]
    for h, s in zip(result["hybrid"], result["softmax"]):
        line = (f"{context_label(h['context']):>8} | {_flops(h['prefill']):>14} {_flops(s['prefill']):>10} | "
                f"{_flops(h['decode']):>13} {_flops(s['decode']):>10}")
        if "prefill_seconds" in h:
            line += f" | {h['prefill_seconds'] * 1e6:>20.1f}µs {s['prefill_seconds'] * 1e6:>8.1f}µs"
        lines.append(line)
    crossover = result["crossover"]
    for what in ("prefill", "decode"):
        n = crossover[what]
        lines.append(f"the hybrid's {what} costs fewer FLOPs per token than the all-softmax twin's "
                     + (f"from {n:,} tokens of context" if n else "at no context"))
    if measured:
        n = crossover["measured_prefill"]
        lines.append(f"measured on {result['device']}: its prefill takes less time per token "
                     + (f"from the measured context {context_label(n)}" if n else "at none of the measured contexts"))
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    lines = []
    for name, rows, color in (("hybrid", result["hybrid"], "C0"), ("all-softmax", result["softmax"], "C3")):
        x = [r["context"] for r in rows]
        lines.append(Line(f"{name}: prefill", x, [r["prefill"] for r in rows], "-", color))
        lines.append(Line(f"{name}: decode", x, [r["decode"] for r in rows], "--", color))
    save_plot(path, lines, "context (tokens)", "FLOPs per token", "FLOPs per token by context")
