"""Learning-rate schedules, as functions of the optimizer step."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WarmupStableDecay:
    """Linear warmup from 0 to `peak_lr`, constant, then a linear decay over the last `decay_steps`
    steps towards `min_lr` (reached at `total_steps`, one step after the last). Where warmup and
    decay overlap, the lower of the two applies."""

    peak_lr: float
    warmup_steps: int
    decay_steps: int
    total_steps: int
    min_lr: float = 0.0

    def __call__(self, step: int) -> float:
        warmup = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        decay = min(1.0, (self.total_steps - step) / self.decay_steps) if self.decay_steps else 1.0
        return min(self.peak_lr * warmup, self.min_lr + (self.peak_lr - self.min_lr) * decay)
