"""MLA attention of new tokens against a paged latent cache, in the absorbed form: the entry point,
input checks and dispatch.

The cache of one MLA layer is `cache` [num_pages, page_size, r + rope]: per token the normalised
latent and the rotated rope key, shared by all heads. Sequence n owns the pages
`block_tables[n, :ceil(seq_lens[n] / page_size)]`; its new tokens (rows `query_start[n]:query_start[n + 1]`
of q, already written to the cache) are its last ones, as in `paged_attention`. Nothing is
decompressed: `kv_b` [H·(nope + v), r] splits per head into W_uk [nope, r] and W_uv [v, r], and
q_nope · k_nope = (q_nope · W_uk) · latent, o = (softmax · latent) · W_uvᵀ, so the attention runs in
the latent space and reads each cached entry once for all heads. The kernel policy picks the Triton
kernel or the gather-then-SDPA reference (`ops.policy`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..paged_attention import check_paged_batch
from ..policy import KernelPolicy, latent_attention_kernel
from .reference import latent_attention_reference

__all__ = ["DECOMPRESS_MIN_QUERIES", "latent_attention_reference", "paged_latent_attention"]

# From this many new tokens on, a prompt chunk is cheaper in the decompressed form (the engine's
# choice, `infer.context`): expanding its context of L tokens into heads costs L·2·r·H·(nope + v)
# FLOPs once, and every query-key pair then costs H·2·(nope + rope + v) instead of the absorbed
# form's H·2·(2r + rope): at the published shapes the two meet near 170 queries, whatever L; the
# decompressed attention also runs on FlashAttention's tensor-core tiles.
DECOMPRESS_MIN_QUERIES = 128


def paged_latent_attention(q: Tensor, cache: Tensor, kv_b: Tensor, block_tables: Tensor, seq_lens: Tensor,
                           query_start: Tensor, scale: float, max_query_len: int,
                           policy: KernelPolicy = KernelPolicy(), tree_ancestors: Tensor | None = None) -> Tensor:
    """q [T, H, nope + rope] (all sequences' new tokens packed, rope part rotated); cache [P, page_size,
    r + rope]; kv_b [H·(nope + v), r] (`kv_b_proj.weight`); block_tables [N, max_pages] int32;
    seq_lens [N] int32 (tokens in the cache after this step); query_start [N+1] int32 offsets into T;
    `max_query_len` the longest run of new tokens (a host int: it sizes the launch); `tree_ancestors`
    [T] int64 (`ops.tree`): the new tokens are draft trees, as in `paged_attention`. Returns
    o [T, H, v]. Shape checks only: nothing reads the device."""
    if q.dim() != 3 or cache.dim() != 3 or kv_b.dim() != 2:
        raise ValueError(f"q must be [T, H, nope + rope], the cache [P, page_size, r + rope] and kv_b "
                         f"[H·(nope + v), r], got {list(q.shape)}, {list(cache.shape)}, {list(kv_b.shape)}")
    _, H, qk = q.shape
    r = kv_b.shape[1]
    rope = cache.shape[2] - r
    if not 0 < rope < qk or kv_b.shape[0] % H or kv_b.shape[0] // H <= qk - rope:
        raise ValueError(f"the cache entry ({cache.shape[2]}) must be kv_b's rank ({r}) plus the query's rope "
                         f"part, and kv_b {list(kv_b.shape)} must hold {H} heads of nope + v rows")
    check_paged_batch(q, cache, block_tables, seq_lens, query_start)
    if tree_ancestors is not None and tree_ancestors.shape != (q.shape[0],):
        raise ValueError(f"tree_ancestors must be [T]=[{q.shape[0]}], got {list(tree_ancestors.shape)}")
    nope = qk - rope
    w_uk, w_uv = kv_b.view(H, -1, r).split([nope, kv_b.shape[0] // H - nope], dim=1)
    q_latent = torch.einsum("thn,hnr->thr", q[..., :nope], w_uk)
    absorbed = torch.cat([q_latent, q[..., nope:]], dim=-1)
    match latent_attention_kernel(policy, absorbed, cache):
        case "paged":
            from .kernel import latent_attention_triton
            o = latent_attention_triton(absorbed, cache, block_tables, seq_lens, query_start, scale, r,
                                        max_query_len, tree_ancestors)
        case "gather_reference":
            o = latent_attention_reference(absorbed, cache, block_tables, seq_lens, query_start, scale, r,
                                           tree_ancestors)
    return torch.einsum("thr,hvr->thv", o, w_uv)
