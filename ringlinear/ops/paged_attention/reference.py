"""Readable PyTorch reference of paged attention: gather each sequence's pages into contiguous keys
and values, then run causal SDPA with the new tokens at the end of the sequence."""

from __future__ import annotations

import torch
from torch import Tensor

from ..attention import causal_attention


def paged_attention_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                              seq_lens: Tensor, query_start: Tensor, scale: float) -> Tensor:
    page = k_cache.shape[1]
    starts, lengths = query_start.tolist(), seq_lens.tolist()
    outputs = []
    for n, length in enumerate(lengths):
        pages = block_tables[n, : -(-length // page)].long()
        k = k_cache[pages].flatten(0, 1)[:length]
        v = v_cache[pages].flatten(0, 1)[:length]
        queries = q[starts[n]:starts[n + 1]]
        outputs.append(causal_attention(queries[None], k[None], v[None], scale)[0])
    return torch.cat(outputs) if outputs else torch.empty_like(q)
