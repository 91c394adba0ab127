"""Token sampling from logits: greedy, temperature, top-k, top-p and min-p, repetition, presence
and frequency penalties, per-row generators and log-probabilities; every setting is per row."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def _per_row(value: float | int | Tensor, rows: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.as_tensor(value, device=device, dtype=dtype).expand(rows)


def apply_penalties(logits: Tensor, output_counts: Tensor, seen: Tensor, repetition: float | Tensor = 1.0,
                    presence: float | Tensor = 0.0, frequency: float | Tensor = 0.0) -> Tensor:
    """logits [B, V] fp32; output_counts [B, V]: how often each token was generated so far; seen
    [B, V] bool: the token is in the prompt or was generated. Repetition (> 0, 1 = off) divides the
    positive logits of seen tokens and multiplies their negative ones (CTRL, as HF and vLLM do);
    presence and frequency subtract `presence · [count > 0] + frequency · count` (OpenAI)."""
    B = logits.shape[0]
    repetition = _per_row(repetition, B, logits.device, logits.dtype)[:, None]
    presence = _per_row(presence, B, logits.device, logits.dtype)[:, None]
    frequency = _per_row(frequency, B, logits.device, logits.dtype)[:, None]
    penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, penalised, logits)
    return logits - presence * (output_counts > 0) - frequency * output_counts


def filter_logits(logits: Tensor, top_k: int | Tensor = 0, top_p: float | Tensor = 1.0,
                  min_p: float | Tensor = 0.0) -> Tensor:
    """Set to -inf every logit outside the row's top-k (0 = off), every token less likely than
    min-p times the most likely one (0 = off), and then every token outside the smallest set whose
    probability reaches top-p (1.0 = off). logits: [B, V] fp32. With every filter off as a number
    (not a per-row tensor) the logits are returned as they are, without sorting the vocabulary."""
    if not isinstance(top_k, Tensor) and not isinstance(top_p, Tensor) and not isinstance(min_p, Tensor) \
            and top_k == 0 and top_p == 1.0 and min_p == 0.0:
        return logits
    B, V = logits.shape
    top_k = _per_row(top_k, B, logits.device, torch.long)
    top_p = _per_row(top_p, B, logits.device, logits.dtype)
    min_p = _per_row(min_p, B, logits.device, logits.dtype)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(V, device=logits.device)
    drop = (top_k[:, None] > 0) & (rank[None, :] >= top_k[:, None])
    drop = drop | (sorted_logits < sorted_logits[:, :1] + min_p.log()[:, None])  # p / p_max < min_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # keep a token while the mass before it is below top_p
    # top_p = 1 is off: the fp32 cumulative sum can reach 1 before the last tokens
    drop = drop | ((mass_before >= top_p[:, None]) & (rank[None, :] > 0) & (top_p[:, None] < 1))
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


def sample(logits: Tensor, temperature: float | Tensor = 1.0, top_k: int | Tensor = 0,
           top_p: float | Tensor = 1.0, generator: torch.Generator | None = None, *,
           min_p: float | Tensor = 0.0, row_generators: Mapping[int, torch.Generator] | None = None) -> Tensor:
    """Next token per row of logits [B, V]; rows with temperature 0 are greedy. Rows named in
    `row_generators` draw from their own generator, so a seeded request gets the same tokens
    whatever else shares its batch; the others draw from `generator`. A positive number for the
    temperature (every row's) skips the greedy rows' argmax, and 1 the division. Returns [B] long."""
    logits = logits.float()
    B = logits.shape[0]
    if isinstance(temperature, Tensor) or temperature <= 0:
        temperature = _per_row(temperature, B, logits.device, logits.dtype)
        greedy = temperature <= 0
        scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
    else:
        greedy = None
        scaled = logits if temperature == 1 else logits / temperature
    probs = filter_logits(scaled, top_k, top_p, min_p).softmax(-1)
    # Exponential race: argmax p / E with E ~ Exp(1) i.i.d. is a draw from p (the Gumbel-max trick),
    # and each row's E can come from its own generator.
    row_generators = row_generators or {}
    noise = torch.empty_like(probs)
    if len(row_generators) < B:  # some rows draw from the shared generator
        noise.exponential_(generator=generator)
    for row, row_generator in row_generators.items():
        noise[row].exponential_(generator=row_generator)
    sampled = (probs / noise).argmax(-1)
    return sampled if greedy is None else torch.where(greedy, logits.argmax(-1), sampled)


def token_logprobs(logits: Tensor, tokens: Tensor, num_top: int) -> tuple[Tensor, Tensor, Tensor]:
    """Log-probabilities under the model's own distribution (the logits before penalties,
    temperature or filtering): of `tokens` [B], and of the `num_top` most likely tokens per row.
    Returns (chosen [B], top values [B, num_top], top ids [B, num_top])."""
    logp = logits.float().log_softmax(-1)
    top = logp.topk(num_top, dim=-1)
    return logp.gather(-1, tokens[:, None])[:, 0], top.values, top.indices
