"""Attention of new tokens against a paged KV cache: the entry point, input checks and dispatch.

The cache of one layer is `k_cache`, `v_cache` [num_pages, page_size, KV, D]; sequence n owns the
pages `block_tables[n, :ceil(seq_lens[n] / page_size)]`, in order. Its new tokens (rows
`query_start[n]:query_start[n + 1]` of q, already written to the cache) are its last ones, so a
decode step is a query length of 1 and a prefill chunk attends to the cached prefix and causally
to itself. The kernel policy picks the Triton kernel or the gather-then-SDPA reference, and in
invariant mode `attention_by_key_blocks` over the pages' key blocks (`ops.policy`).

With `tree_ancestors` the new tokens of each sequence are a draft tree (`ops.tree`) in its last cache
slots: a token attends to the cached prefix and to its own ancestors-or-self among them. In invariant
mode each tree token reads those keys as the decode step of its root path would (single-key pages
pointing at their slots), so it gets that decode's bits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..attention import attention_by_key_blocks
from ..policy import KernelPolicy, paged_attention_kernel
from ..tree import MAX_TREE_TOKENS, root_path_nodes, token_trees
from .reference import paged_attention_reference

__all__ = ["paged_attention", "paged_attention_reference"]


def check_paged_batch(q: Tensor, cache: Tensor, block_tables: Tensor, seq_lens: Tensor, query_start: Tensor) -> None:
    """The checks every paged op makes of its step: one dtype for the queries and the cache, a block
    table row and query offsets for each of the N sequences."""
    if cache.dtype != q.dtype:
        raise ValueError(f"q and the cache must share a dtype, got {q.dtype} and {cache.dtype}")
    N = seq_lens.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != N or query_start.shape != (N + 1,):
        raise ValueError(f"block_tables must be [N, max_pages] and query_start [N+1] for N={N} sequences, "
                         f"got {list(block_tables.shape)} and {list(query_start.shape)}")


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                    query_start: Tensor, scale: float, max_query_len: int,
                    policy: KernelPolicy = KernelPolicy(), tree_ancestors: Tensor | None = None) -> Tensor:
    """q [T, H, D] (all sequences' new tokens packed); k_cache, v_cache [P, page_size, KV, D];
    block_tables [N, max_pages] int32; seq_lens [N] int32 (tokens in the cache after this step);
    query_start [N+1] int32 offsets into T; `max_query_len` the longest run of new tokens (a host
    int: it sizes the launch); `tree_ancestors` [T] int64 (`ops.tree`): the new tokens are draft trees,
    not causal runs. Returns o [T, H, D]. Shape checks only: nothing reads the device."""
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"q must be [T, H, D] and the caches [P, page_size, KV, D], got {list(q.shape)}, "
                         f"{list(k_cache.shape)}, {list(v_cache.shape)}")
    T, H, D = q.shape
    KV = k_cache.shape[2]
    if k_cache.shape[3] != D or H % KV:
        raise ValueError(f"cache heads {KV} must divide query heads {H} and head dims must match, "
                         f"got q {list(q.shape)}, cache {list(k_cache.shape)}")
    check_paged_batch(q, k_cache, block_tables, seq_lens, query_start)
    if tree_ancestors is not None:
        if tree_ancestors.shape != (T,):
            raise ValueError(f"tree_ancestors must be [T]=[{T}], got {list(tree_ancestors.shape)}")
        if max_query_len > MAX_TREE_TOKENS:
            raise ValueError(f"trees take at most {MAX_TREE_TOKENS} tokens each, got max_query_len={max_query_len}")
    match paged_attention_kernel(policy, q, k_cache):
        case "paged":
            from .kernel import paged_attention_triton
            return paged_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start, scale,
                                          max_query_len, tree_ancestors)
        case "gather_reference":
            return paged_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, query_start, scale,
                                             tree_ancestors)
        case "key_blocks":
            if tree_ancestors is not None:
                return _paged_tree_by_key_blocks(q, k_cache, v_cache, block_tables, seq_lens, query_start, scale,
                                                 tree_ancestors, policy)
            return _paged_by_key_blocks(q, k_cache, v_cache, block_tables, seq_lens, query_start, scale, policy)


def _paged_by_key_blocks(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                         query_start: Tensor, scale: float, policy: KernelPolicy) -> Tensor:
    """The pages are where `attention_by_key_blocks` reads its keys: a query visits the key blocks (and
    gets the bits) of the training forward over the same sequence, whatever the page size."""
    no_offset = torch.zeros(seq_lens.shape[0], dtype=torch.long, device=q.device)
    return attention_by_key_blocks(q, k_cache, v_cache, block_tables, no_offset, seq_lens, query_start, scale, policy)


def _paged_tree_by_key_blocks(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                              query_start: Tensor, scale: float, tree_ancestors: Tensor,
                              policy: KernelPolicy) -> Tensor:
    """Draft trees in the invariant form: each tree token attends as the decode step of its root path
    would, to the cached prefix and then its ancestors and itself at positions prefix + depth. Every
    token becomes a one-query sequence of single-key pages whose table points at those keys' cache
    slots, so it visits the key blocks, and gets the bits, of that decode (the paging only says where
    a key is read from). The table is [T, max_pages · page_size] int32: a long context costs memory."""
    T, page, device = q.shape[0], k_cache.shape[1], q.device
    lengths = query_start[1:] - query_start[:-1]
    seq = token_trees(query_start, T)
    prefix = (seq_lens - lengths)[seq].long()
    path = root_path_nodes(tree_ancestors, MAX_TREE_TOKENS)
    path_len = ((tree_ancestors[:, None] >> torch.arange(MAX_TREE_TOKENS, device=device)) & 1).sum(1)
    key = torch.arange(block_tables.shape[1] * page, device=device)[None]
    step = (key - prefix[:, None]).clamp(0, MAX_TREE_TOKENS - 1)
    position = torch.where(key < prefix[:, None], key, prefix[:, None] + path.gather(1, step))
    pages = block_tables[seq].long().gather(1, (position // page).clamp(max=block_tables.shape[1] - 1))
    table = (pages * page + position % page).to(torch.int32)
    single = (-1, 1, *k_cache.shape[2:])
    no_offset = torch.zeros(T, dtype=torch.long, device=device)
    one_query = torch.arange(T + 1, dtype=query_start.dtype, device=device)
    return attention_by_key_blocks(q, k_cache.view(single), v_cache.view(single), table, no_offset,
                                   (prefix + path_len).to(seq_lens.dtype), one_query, scale, policy)
