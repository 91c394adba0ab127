"""Readable PyTorch reference of paged attention: gather each sequence's pages into contiguous keys
and values, then run causal SDPA with the new tokens at the end of the sequence (or, for draft trees,
SDPA with a mask: the cached prefix and each token's ancestors-or-self)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attention import causal_attention


def paged_attention_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                              seq_lens: Tensor, query_start: Tensor, scale: float,
                              tree_ancestors: Tensor | None = None) -> Tensor:
    page = k_cache.shape[1]
    starts, lengths = query_start.tolist(), seq_lens.tolist()
    outputs = []
    for n, length in enumerate(lengths):
        pages = block_tables[n, : -(-length // page)].long()
        k = k_cache[pages].flatten(0, 1)[:length]
        v = v_cache[pages].flatten(0, 1)[:length]
        queries = q[starts[n]:starts[n + 1]]
        if tree_ancestors is None:
            outputs.append(causal_attention(queries[None], k[None], v[None], scale)[0])
            continue
        m = queries.shape[0]
        tree = (tree_ancestors[starts[n]:starts[n + 1], None] >> torch.arange(m, device=q.device)) & 1 == 1
        mask = torch.cat([tree.new_ones(m, length - m), tree], dim=1)
        o = F.scaled_dot_product_attention(queries.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        outputs.append(o.transpose(0, 1))
    return torch.cat(outputs) if outputs else torch.empty_like(q)
