"""What changes with the optimizer step: the learning rate, the batch size and the context length."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import TrainConfig, parse_stages


@dataclass(frozen=True)
class LearningRate:
    """Linear warmup from 0 to `peak_lr` over `warmup_steps`, then by `kind`:

    - "wsd": constant, then a linear decay over the last `decay_steps` steps towards `min_lr`
      (reached at `total_steps`, one step after the last);
    - "cosine": a cosine from `peak_lr` at the end of warmup to `min_lr` at `total_steps`;
    - "wsm": constant to the end; the decay is emulated afterwards by merging checkpoints.

    Where warmup and decay overlap, the lower of the two applies."""

    kind: str
    peak_lr: float
    warmup_steps: int
    total_steps: int
    decay_steps: int = 0
    min_lr: float = 0.0

    def __call__(self, step: int) -> float:
        warmup = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.kind == "wsd":
            decay = min(1.0, (self.total_steps - step) / self.decay_steps) if self.decay_steps else 1.0
        elif self.kind == "cosine":
            progress = max(0.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
            decay = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        else:
            decay = 1.0
        return min(self.peak_lr * warmup, self.min_lr + (self.peak_lr - self.min_lr) * decay)

    @classmethod
    def of(cls, config: TrainConfig) -> LearningRate:
        return cls(config.lr_schedule, config.lr, config.warmup_steps, config.steps,
                   round(config.decay_fraction * config.steps), config.min_lr)


class Stages:
    """Batch size (sequences over all processes) and sequence length of each step, and where in the
    data stream each step starts: the tokens all earlier steps consumed."""

    def __init__(self, config: TrainConfig):
        self.batch = [(0, config.batch_size)] + parse_stages(config.batch_stages, "batch_stages")
        self.seq = [(0, config.seq_len)] + parse_stages(config.seq_len_stages, "seq_len_stages")

    @staticmethod
    def _at(stages: list[tuple[int, int]], step: int) -> int:
        return [value for start, value in stages if start <= step][-1]

    def batch_size(self, step: int) -> int:
        return self._at(self.batch, step)

    def seq_len(self, step: int) -> int:
        return self._at(self.seq, step)

    def rows(self, step: int) -> tuple[int, int, int | None]:
        """The step's context-length stage as (its first token, the index in it of the step's first row,
        its number of rows or None for the last stage)."""
        begin = [start for start, _ in self.seq if start <= step][-1]
        end = [start for start, _ in self.seq if start > step][:1]
        origin, seq_len = self.position(begin), self.seq_len(step)
        stage_rows = (self.position(end[0]) - origin) // seq_len if end else None
        return origin, (self.position(step) - origin) // seq_len, stage_rows

    def position(self, step: int) -> int:
        bounds = sorted({start for start, _ in self.batch + self.seq if start < step} | {step})
        return sum((end - start) * self.batch_size(start) * self.seq_len(start)
                   for start, end in zip(bounds, bounds[1:]))
