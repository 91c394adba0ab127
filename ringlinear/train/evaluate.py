"""Validation: cross-entropy over fixed windows, reported in nats per token and bits per byte."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import bits_per_byte


def autocast(device: torch.device):
    """bf16 autocast on CUDA (fp32 master weights); full fp32 on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[Tensor], token_bytes: np.ndarray,
             device: torch.device) -> tuple[float, float]:
    """(nats per predicted token, bits per byte) over `batches` [B, T] of token ids: every token
    after the first of each window is predicted; its loss counts over the bytes of its text."""
    was_training = model.training
    model.eval()
    nats, count, num_bytes = 0.0, 0, 0
    for batch in batches:
        batch = batch.to(device)
        with autocast(device):
            logits = model(batch).logits
        targets = batch[:, 1:]
        nats += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="sum").item()
        count += targets.numel()
        num_bytes += int(token_bytes[targets.cpu().numpy()].sum())
    model.train(was_training)
    return nats / count, bits_per_byte(nats, num_bytes)
