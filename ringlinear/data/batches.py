"""Training and validation windows cut from a token stream.

The windows of training step `step` depend on (seed, step) alone, so a run resumed at any step
sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> Tensor:
    return torch.from_numpy(np.stack([tokens[s:s + seq_len] for s in starts]).astype(np.int64))


def _check_length(tokens: np.ndarray, seq_len: int, split: str) -> None:
    if len(tokens) < seq_len:
        raise ValueError(f"the {split} split has {len(tokens)} tokens, fewer than seq_len={seq_len}")


def train_batch(tokens: np.ndarray, seed: int, step: int, batch_size: int, seq_len: int) -> Tensor:
    """[batch_size, seq_len] windows at uniformly random offsets drawn from (seed, step)."""
    _check_length(tokens, seq_len, "training")
    starts = np.random.default_rng([seed, step]).integers(0, len(tokens) - seq_len + 1, size=batch_size)
    return _windows(tokens, starts, seq_len)


def validation_batches(tokens: np.ndarray, num_batches: int, batch_size: int, seq_len: int) -> list[Tensor]:
    """A fixed set of `num_batches` × `batch_size` windows spread evenly over the validation stream."""
    _check_length(tokens, seq_len, "validation")
    starts = np.linspace(0, len(tokens) - seq_len, num_batches * batch_size).round().astype(np.int64)
    return list(_windows(tokens, starts, seq_len).split(batch_size))
