"""Plain generation: prefill the prompt into a `HybridCache`, then decode token by token."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .model import HybridCache, RingLinearForCausalLM
from .sampling import sample


@torch.no_grad()
def generate(model: RingLinearForCausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int = 128,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_ids: Sequence[int] = (), seed: int | None = None,
             on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Continue each prompt (a list of token ids) by up to `max_new_tokens` tokens.

    Prompts of equal length run as one batch. A sequence stops at its first token in
    `eos_token_ids` (not included in the result). `on_token(row, token)` sees tokens as they come.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    vocab = model.config.vocab_size
    for p in prompts:
        if min(p) < 0 or max(p) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got {min(p)}..{max(p)}")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    results: list[list[int]] = [[] for _ in prompts]
    by_length: dict[int, list[int]] = {}
    for row, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(row)
    for length, rows in by_length.items():
        ids = torch.tensor([list(prompts[r]) for r in rows], device=device)
        outputs = _generate_batch(model, ids, max_new_tokens, temperature, top_k, top_p,
                                  set(eos_token_ids), generator,
                                  None if on_token is None else (lambda i, t, rows=rows: on_token(rows[i], t)))
        for r, out in zip(rows, outputs):
            results[r] = out
    return results


def _generate_batch(model, ids, max_new_tokens, temperature, top_k, top_p, eos, generator, on_token):
    B, T = ids.shape
    dtype = next(model.parameters()).dtype
    cache = HybridCache(model.config, B, T + max_new_tokens, device=ids.device, dtype=dtype)
    outputs: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    tokens = ids
    for _ in range(max_new_tokens):
        logits = model(tokens, context=cache, logits_to_keep=1).logits[:, -1]
        tokens = sample(logits, temperature, top_k, top_p, generator)[:, None]
        for i, token in enumerate(tokens[:, 0].tolist()):
            if done[i]:
                continue
            if token in eos:
                done[i] = True
                continue
            outputs[i].append(token)
            if on_token is not None:
                on_token(i, token)
        if all(done):
            break
    return outputs
