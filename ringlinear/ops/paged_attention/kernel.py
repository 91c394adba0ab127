"""Paged attention in Triton, for decode and chunked prefill alike.

Each sequence n has `q_len` new tokens (rows of q from `query_start[n]`) that are the last of its
`seq_len` tokens; its keys and values live in pages of the cache listed by `block_tables[n]`.
One program takes one KV head and a tile of BLOCK_M rows = (token, head-of-the-group) pairs, so a
page of keys is read once for all query heads that share it (GQA), and runs an online softmax over
the pages up to its last token's position. A decode step is a tile of one token × GROUP heads.
No host synchronisation: the page loop's bound is read on the device, so decode steps can be
captured in a CUDA graph. With TREE the new tokens are draft trees: a row sees a new token's key only
if that token is its own ancestor-or-self (a bit of its ancestor mask), the prefix as before.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..launch import cdiv, next_power_of_2

LOG2E = 1.4426950408889634  # softmax runs in the exp2 domain


@triton.jit
def tile_tokens(query_start, seq_lens, n, tile, BLOCK_M: tl.constexpr, GROUP: tl.constexpr):
    """The rows of program (sequence n, tile): BLOCK_M rows = (token, head-of-the-group) pairs of the
    sequence's new tokens. Returns its q_start, q_len and seq_len, each row's token and head within
    the group, and which rows hold a token."""
    TOKENS: tl.constexpr = BLOCK_M // GROUP
    q_start = tl.load(query_start + n)
    q_len = tl.load(query_start + n + 1) - q_start
    seq_len = tl.load(seq_lens + n)
    rows = tl.arange(0, BLOCK_M)
    token = tile * TOKENS + rows // GROUP
    valid = (rows < TOKENS * GROUP) & (token < q_len)
    return q_start, q_len, seq_len, token, rows % GROUP, valid


@triton.jit
def online_softmax_step(s, m, mass, acc, values):
    """Fold a block of scores s [rows, keys] (log2 domain, -inf where hidden) and its values
    [keys, ·] into the running max m, softmax mass and output acc."""
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    probs = tl.exp2(s - m_new[:, None])
    mass = mass * alpha + tl.sum(probs, 1)
    acc = acc * alpha[:, None] + tl.dot(probs.to(values.dtype), values)
    return m_new, mass, acc


@triton.jit
def tree_visible(bits, k_pos, prefix):
    """[rows, keys]: the cached prefix, and among the draft-tree tokens after it each row's
    ancestors-or-self (bit j of its mask `bits` for tree token j)."""
    tree_index = k_pos - prefix  # negative in the cached prefix
    ancestor = ((bits[:, None] >> tl.maximum(tree_index, 0).to(tl.int64)[None, :]) & 1) != 0
    return (tree_index < 0)[None, :] | ancestor


@triton.jit
def _paged_attention_kernel(
    q, k_cache, v_cache, o, block_tables, seq_lens, query_start, ancestors, qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_page, stride_slot, stride_kvh, stride_table,
    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, TREE: tl.constexpr,
):
    n = tl.program_id(0)
    kv_head = tl.program_id(1)
    tile = tl.program_id(2)
    TOKENS: tl.constexpr = BLOCK_M // GROUP
    q_start, q_len, seq_len, token, group_head, valid = tile_tokens(query_start, seq_lens, n, tile, BLOCK_M, GROUP)
    if tile * TOKENS >= q_len:
        return
    head = kv_head * GROUP + group_head
    q_pos = seq_len - q_len + token  # position of each row's token in its sequence
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D

    q_rows = (q_start + token).to(tl.int64)
    tile_q = tl.load(q + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                     mask=valid[:, None] & d_ok[None, :], other=0.0)
    if TREE:
        bits = tl.load(ancestors + q_rows, mask=valid, other=0)
    # A finite start keeps rows that see no key (padding rows) free of inf - inf.
    m = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    kv_end = tl.minimum(seq_len, seq_len - q_len + (tile + 1) * TOKENS)  # keys the tile's last token sees
    slots = tl.arange(0, PAGE)
    for p in range(0, tl.cdiv(kv_end, PAGE)):
        page = tl.load(block_tables + n * stride_table + p).to(tl.int64)
        k_pos = p * PAGE + slots
        offsets = page * stride_page + slots[:, None] * stride_slot + kv_head * stride_kvh + d[None, :]
        kv_mask = (k_pos < kv_end)[:, None] & d_ok[None, :]
        keys = tl.load(k_cache + offsets, mask=kv_mask, other=0.0)
        values = tl.load(v_cache + offsets, mask=kv_mask, other=0.0)
        s = tl.dot(tile_q, tl.trans(keys)) * qk_scale
        visible = (k_pos[None, :] <= q_pos[:, None]) & (k_pos < kv_end)[None, :]
        if TREE:
            visible = visible & tree_visible(bits, k_pos, seq_len - q_len)
        m, l, acc = online_softmax_step(tl.where(visible, s, float("-inf")), m, l, acc, values)
    acc = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(o + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             acc.to(o.dtype.element_ty), mask=valid[:, None] & d_ok[None, :])


def _tile_rows(group: int, max_query_len: int) -> int:
    """Rows per program: one token's heads for decode (at least 16 for the tensor cores), 64 rows
    (64 / group tokens) for prefill."""
    rows = 16 if max_query_len == 1 else 64
    return max(rows, next_power_of_2(group))


def paged_attention_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                           seq_lens: Tensor, query_start: Tensor, scale: float, max_query_len: int,
                           tree_ancestors: Tensor | None = None) -> Tensor:
    """Triton backend of `paged_attention` (inputs validated by the dispatcher)."""
    T, H, D = q.shape
    num_seqs = seq_lens.shape[0]
    _, page, kv_heads, _ = k_cache.shape
    group = H // kv_heads
    block_m = _tile_rows(group, max_query_len)
    tokens_per_tile = block_m // group
    o = torch.empty_like(q)
    grid = (num_seqs, kv_heads, cdiv(max_query_len, tokens_per_tile))
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, o, block_tables, seq_lens, query_start,
        query_start if tree_ancestors is None else tree_ancestors, scale * LOG2E,  # unread without TREE
        q.stride(0), q.stride(1), o.stride(0), o.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, D=D, BLOCK_D=next_power_of_2(D), PAGE=page, BLOCK_M=block_m,
        TREE=tree_ancestors is not None,
    )
    return o
