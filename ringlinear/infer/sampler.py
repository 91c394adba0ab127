"""The engine's sampler: the next token of every sampled sequence from its logits row, with each
request's own options, penalties and generator, and the log-probs it asked for; and the log-probs
of prompt tokens, from the hidden states of the rows that predict them."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..ops.batch_invariant import numerics
from ..ops.policy import KernelPolicy
from ..sampling import apply_penalties, filter_logits, sample, token_logprobs
from .outputs import TokenLogprob
from .scheduler import ScheduledChunk, Sequence
from .spec.rejection import accept_tree, greedy_path

PROMPT_LOGPROB_ROWS = 1024  # rows of [rows, V] fp32 logits made at a time for prompt log-probs


class Verified(NamedTuple):
    """What a verify chunk gave: its accepted draft nodes, root to leaf, and the tokens it emits."""
    path: list[int]
    tokens: list[int]
    logprobs: list[TokenLogprob | None]


class Sampler:
    def __init__(self, policy: KernelPolicy, device: torch.device, seed: int):
        self.policy = policy  # invariant: log-probs bit-identical to the training forward's
        self.device = device
        self.generator = torch.Generator(device).manual_seed(seed)  # shared by requests without a seed

    def __call__(self, logits: Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits [len(seqs), V] fp32 -> the token of each sequence and its log-probs (None where not asked)."""
        with numerics(self.policy):
            return self._sample(logits, seqs)

    def _sample(self, logits: Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
        params = [s.params for s in seqs]
        if all(p.greedy and not p.penalised for p in params):
            tokens = logits.argmax(-1)
        else:
            def per_row(name: str, dtype: torch.dtype = torch.float32) -> Tensor:
                return torch.tensor([getattr(p, name) for p in params], dtype=dtype, device=logits.device)

            processed = logits
            if any(p.penalised for p in params):
                counts, seen = self._token_counts(seqs, logits.shape[-1])
                processed = apply_penalties(logits, counts, seen, per_row("repetition_penalty"),
                                            per_row("presence_penalty"), per_row("frequency_penalty"))
            # per-row filters only where a request sets one: else sampling skips the vocabulary's sort
            filtered = any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in params)
            top_k, top_p, min_p = (per_row("top_k", torch.long), per_row("top_p"), per_row("min_p")) if filtered \
                else (0, 1.0, 0.0)
            # one positive temperature for all (RL's, the API's default): a number, no per-row division
            temperatures = {p.temperature for p in params}
            temperature = temperatures.pop() if len(temperatures) == 1 and min(temperatures) > 0 \
                else per_row("temperature")
            tokens = sample(processed, temperature, top_k, top_p, self.generator, min_p=min_p,
                            row_generators={i: s.generator for i, s in enumerate(seqs) if s.generator})
        token_list = tokens.tolist()
        num_top = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        if num_top is None:
            return token_list, [None] * len(seqs)
        chosen, top_values, top_ids = (t.tolist() for t in token_logprobs(logits, tokens, num_top))
        logprobs = [None if p.logprobs is None else
                    TokenLogprob(token, chosen[i], list(zip(top_ids[i][:p.logprobs], top_values[i][:p.logprobs])))
                    for i, (p, token) in enumerate(zip(params, token_list))]
        return token_list, logprobs

    def verify(self, logits: Tensor, verifies: list[tuple[ScheduledChunk, int]]) -> list[Verified]:
        """For each verify chunk (and its first row of `logits`: its rows [1 + m, V], row i after its
        node i, the root 0 then the m draft nodes), the path of draft nodes the target accepts, the
        tokens it emits (that path's, then the token after it) and their log-probs (None where not
        asked). Rejection sampling: the tokens are distributed as the target's own samples; greedy:
        its argmax path, the argmax of every row read back at once. Penalised requests draft
        nothing, so the distribution is the same for every row but for its context."""
        with numerics(self.policy):
            best = logits.argmax(-1).tolist() if any(c.seq.params.greedy for c, _ in verifies) else []
            return [self._verify(logits[row:row + chunk.num_tokens], chunk, best[row:row + chunk.num_tokens])
                    for chunk, row in verifies]

    def _verify(self, logits: Tensor, chunk: ScheduledChunk, best: list[int]) -> Verified:
        seq, params = chunk.seq, chunk.seq.params
        tokens = [0, *chunk.drafts]
        if params.greedy:
            path, token = greedy_path(chunk.tree_parents, tokens, best)
        else:
            target = filter_logits(logits / params.temperature, params.top_k, params.top_p, params.min_p).softmax(-1)
            path, token = accept_tree(chunk.tree_parents, torch.tensor(tokens), target, None,
                                      generator=seq.generator or self.generator)
        emitted = [*(tokens[node] for node in path), token]
        if params.logprobs is None:
            return Verified(path, emitted, [None] * len(emitted))
        chosen, top_values, top_ids = (t.tolist() for t in token_logprobs(
            logits[[0, *path]], torch.tensor(emitted, device=logits.device), params.logprobs))
        return Verified(path, emitted, [TokenLogprob(token, chosen[i], list(zip(top_ids[i], top_values[i])))
                                        for i, token in enumerate(emitted)])

    def prompt_logprobs(self, head: nn.Module, hidden: Tensor, rows: Tensor, targets: Tensor,
                        num_top: int) -> list[TokenLogprob]:
        """Log-probs of `targets` [n] (prompt tokens) from the LM head over `hidden[rows]`, the rows
        that predict them, with each row's `num_top` most likely tokens."""
        values: list[TokenLogprob] = []
        with numerics(self.policy):
            for i in range(0, rows.shape[0], PROMPT_LOGPROB_ROWS):
                part = slice(i, i + PROMPT_LOGPROB_ROWS)
                logits = head(hidden[rows[part]]).float()
                chosen, top_values, top_ids = (t.tolist() for t in token_logprobs(logits, targets[part], num_top))
                ranks = ((logits > logits.gather(-1, targets[part, None])).sum(-1) + 1).tolist()
                values += [TokenLogprob(token, c, list(zip(ids, vals)), rank)
                           for token, c, ids, vals, rank in zip(targets[part].tolist(), chosen, top_ids, top_values,
                                                                ranks)]
        return values

    def _token_counts(self, seqs: list[Sequence], vocab: int) -> tuple[Tensor, Tensor]:
        """[N, V] counts of each generated token and whether each token was seen (prompt or output)."""
        counts = torch.zeros(len(seqs), vocab, device=self.device)
        seen = torch.zeros(len(seqs), vocab, dtype=torch.bool, device=self.device)
        for i, seq in enumerate(seqs):
            if seq.params.penalised:
                output = torch.tensor(seq.output_ids, dtype=torch.long, device=self.device)
                counts[i].index_add_(0, output, torch.ones_like(output, dtype=counts.dtype))
                seen[i, torch.tensor(seq.token_ids, device=self.device)] = True
        return counts, seen
