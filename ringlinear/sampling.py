"""Token sampling from logits: greedy, temperature, top-k and top-p, each settable per row."""

from __future__ import annotations

import torch
from torch import Tensor


def _per_row(value: float | int | Tensor, rows: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.as_tensor(value, device=device, dtype=dtype).expand(rows)


def filter_logits(logits: Tensor, top_k: int | Tensor = 0, top_p: float | Tensor = 1.0) -> Tensor:
    """Set to -inf every logit outside the row's top-k (0 = off) and outside the smallest set of
    tokens whose probability reaches top-p (1.0 = off). logits: [B, V] fp32."""
    B, V = logits.shape
    top_k = _per_row(top_k, B, logits.device, torch.long)
    top_p = _per_row(top_p, B, logits.device, logits.dtype)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(V, device=logits.device)
    drop = (top_k[:, None] > 0) & (rank[None, :] >= top_k[:, None])
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # keep a token while the mass before it is below top_p
    drop = drop | ((mass_before >= top_p[:, None]) & (rank[None, :] > 0))
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


def sample(logits: Tensor, temperature: float | Tensor = 1.0, top_k: int | Tensor = 0,
           top_p: float | Tensor = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """Next token per row of logits [B, V]; rows with temperature 0 are greedy. Returns [B] long."""
    logits = logits.float()
    B = logits.shape[0]
    temperature = _per_row(temperature, B, logits.device, logits.dtype)
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
    probs = filter_logits(scaled, top_k, top_p).softmax(-1)
    sampled = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return torch.where(greedy, logits.argmax(-1), sampled)
