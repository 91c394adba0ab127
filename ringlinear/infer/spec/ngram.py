"""The n-gram (prompt-lookup) drafter: no weights, just the sequence's own tokens. Where the text
repeats itself (code, quotes of the prompt), what followed an earlier occurrence of the last few
tokens is a good guess of what follows them now."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class NgramProposer:
    def __init__(self, num_speculative_tokens: int, prompt_lookup_min: int, prompt_lookup_max: int):
        self.k, self.min_n, self.max_n = num_speculative_tokens, prompt_lookup_min, prompt_lookup_max

    def propose(self, token_ids: Sequence[int]) -> list[int]:
        """Up to k tokens: those that followed the most recent earlier occurrence of the longest suffix
        of `token_ids` of prompt_lookup_min..max tokens; none if no such suffix occurred before."""
        tokens = np.asarray(token_ids, dtype=np.int64)
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)  # all but the suffix itself
            hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return tokens[start:start + self.k].tolist()
        return []
