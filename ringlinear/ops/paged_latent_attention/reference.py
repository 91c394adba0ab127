"""Readable PyTorch reference of absorbed MLA attention over paged latents: with the query absorbed
(q_nope · W_uk next to q_rope), every head attends to the same cache entry, so this is multi-query
attention with one KV head whose key is the whole entry [latent | rope key] and whose value is its
latent part: the gather-then-SDPA reference of paged attention on that single head."""

from __future__ import annotations

from torch import Tensor

from ..paged_attention import paged_attention_reference


def latent_attention_reference(q: Tensor, cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                               query_start: Tensor, scale: float, latent_dim: int,
                               tree_ancestors: Tensor | None = None) -> Tensor:
    """q [T, H, r + rope] (absorbed), cache [P, page_size, r + rope] -> o [T, H, r] (latent space);
    `tree_ancestors` as paged attention's."""
    keys = cache[:, :, None]
    return paged_attention_reference(q, keys, keys[..., :latent_dim], block_tables, seq_lens, query_start, scale,
                                     tree_ancestors)
