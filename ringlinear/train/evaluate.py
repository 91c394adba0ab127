"""Validation: cross-entropy over packed, document-masked rows, in nats per token and bits per byte."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..data import PackedBatch, bits_per_byte
from ..model import SequenceContext
from ..ops.policy import KernelPolicy
from .parallel import all_reduce


def predicted_tokens(batch: PackedBatch) -> np.ndarray:
    """The tokens that have a prediction: all but the first of each document piece."""
    ids, cu = batch.input_ids[0].cpu().numpy(), batch.cu_seqlens.tolist()
    return np.concatenate([ids[start + 1:end] for start, end in zip(cu, cu[1:])])


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[PackedBatch], token_bytes: np.ndarray,
             policy: KernelPolicy) -> tuple[float, float]:
    """(nats per predicted token, bits per byte) over this process's `batches` and every other
    process's: each predicted token's loss counts over the UTF-8 bytes of its text."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nats, tokens, bytes
    for batch in batches:
        targets = predicted_tokens(batch)
        batch = batch.to(device)
        lm_loss = model(batch.input_ids, labels=batch.input_ids, context=SequenceContext(batch.cu_seqlens, policy),
                        return_logits=False).lm_loss
        totals += torch.tensor([lm_loss.item() * len(targets), len(targets), token_bytes[targets].sum()],
                               dtype=torch.float64, device=device)
    model.train(was_training)
    nats, count, num_bytes = all_reduce(totals).tolist()
    return nats / count, bits_per_byte(nats, int(num_bytes))
