"""Absorbed MLA attention over paged latents in Triton, for decode and chunked prefill alike.

Every query head reads the same cache entry per token, [latent (R) | rope key (ROPE)], so one program
takes a tile of BLOCK_M rows = (token, head) pairs of one sequence, all heads of its tokens, and
streams the sequence's entries once in blocks of BLOCK_N tokens (a page holds whole blocks): the
scores are q_latent · latentᵀ + q_rope · ropeᵀ, and the same latent block, already loaded, is the
values. An online softmax runs in the exp2 domain.

A decode step has one tile per sequence, too few programs to fill the GPU, so the keys are split
(flash-decoding): program `split` of SPLITS takes its share of the blocks its tile sees, writes its
partial output and log-sum-exp, and `_combine` merges them. The shares are cut from the sequence's
length on the device: no host synchronisation, so decode steps can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..launch import cdiv, next_power_of_2
from ..paged_attention.kernel import online_softmax_step, tile_tokens, tree_visible

LOG2E = 1.4426950408889634


@triton.jit
def _latent_attention_kernel(
    q, cache, o, lse, block_tables, seq_lens, query_start, ancestors, qk_scale,
    stride_qt, stride_qh, stride_page, stride_slot, stride_table, stride_os, stride_ot, stride_oh,
    stride_ls, stride_lt,
    H: tl.constexpr, R: tl.constexpr, ROPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_ROPE: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, SPLITS: tl.constexpr, TREE: tl.constexpr,
):
    n = tl.program_id(0)
    tile = tl.program_id(1)
    split = tl.program_id(2)
    TOKENS: tl.constexpr = BLOCK_M // H
    q_start, q_len, seq_len, token, head, valid = tile_tokens(query_start, seq_lens, n, tile, BLOCK_M, H)
    if tile * TOKENS >= q_len:
        return
    q_pos = seq_len - q_len + token
    r = tl.arange(0, BLOCK_R)
    e = tl.arange(0, BLOCK_ROPE)
    r_ok, e_ok = r < R, e < ROPE

    q_rows = (q_start + token).to(tl.int64)
    q_base = q + q_rows[:, None] * stride_qt + head[:, None] * stride_qh
    if TREE:  # the new tokens are draft trees: a row sees a new token only if it is an ancestor-or-self
        bits = tl.load(ancestors + q_rows, mask=valid, other=0)
    q_latent = tl.load(q_base + r[None, :], mask=valid[:, None] & r_ok[None, :], other=0.0)
    q_rope = tl.load(q_base + R + e[None, :], mask=valid[:, None] & e_ok[None, :], other=0.0)
    m = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: rows that see no key stay free of inf - inf
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)

    kv_end = tl.minimum(seq_len, seq_len - q_len + (tile + 1) * TOKENS)  # keys the tile's last token sees
    num_blocks = tl.cdiv(kv_end, BLOCK_N)
    share = tl.cdiv(num_blocks, SPLITS)
    slots = tl.arange(0, BLOCK_N)
    for b in range(split * share, tl.minimum((split + 1) * share, num_blocks)):
        k_pos = b * BLOCK_N + slots
        page = tl.load(block_tables + n * stride_table + (b * BLOCK_N) // PAGE).to(tl.int64)
        entry = cache + page * stride_page + (k_pos % PAGE)[:, None] * stride_slot
        in_seq = k_pos < kv_end
        latent = tl.load(entry + r[None, :], mask=in_seq[:, None] & r_ok[None, :], other=0.0)
        rope = tl.load(entry + R + e[None, :], mask=in_seq[:, None] & e_ok[None, :], other=0.0)
        s = (tl.dot(q_latent, tl.trans(latent)) + tl.dot(q_rope, tl.trans(rope))) * qk_scale
        visible = (k_pos[None, :] <= q_pos[:, None]) & in_seq[None, :]
        if TREE:
            visible = visible & tree_visible(bits, k_pos, seq_len - q_len)
        m, l, acc = online_softmax_step(tl.where(visible, s, float("-inf")), m, l, acc, latent)
    acc = acc / tl.where(l > 0, l, 1.0)[:, None]
    out = o + split * stride_os + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + r[None, :]
    tl.store(out, acc.to(o.dtype.element_ty), mask=valid[:, None] & r_ok[None, :])
    if SPLITS > 1:  # log2 of the split's softmax mass; about -1e30 for a split without keys
        tl.store(lse + split * stride_ls + q_rows * stride_lt + head, m + tl.log2(tl.maximum(l, 1e-30)), mask=valid)


ACCUMULATOR = 16384  # fp32 values of a program's [rows, R] output accumulator beyond which it takes 8 warps


def _tile_rows(num_heads: int, max_query_len: int, block_r: int) -> int:
    """Rows per program: one token's heads for decode (at least 16 for the tensor cores); for prefill
    up to 64 rows, fewer for a wide latent so that the accumulator stays within ACCUMULATOR values."""
    rows = 16 if max_query_len == 1 else max(16, min(64, ACCUMULATOR // block_r))
    return max(rows, next_power_of_2(num_heads))


def _num_splits(programs: int, device: torch.device) -> int:
    """Splits of the keys that give about two programs per streaming multiprocessor (at most 16)."""
    processors = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(16, -(-2 * processors // programs)))


def _combine(partial: Tensor, lse: Tensor) -> Tensor:
    """Merge the splits' outputs [S, T, H, R] by their log2 softmax masses [S, T, H]."""
    weights = torch.softmax(lse * (1 / LOG2E), dim=0)  # log2 -> natural log
    return (partial * weights[..., None]).sum(0)


def latent_attention_triton(q: Tensor, cache: Tensor, block_tables: Tensor, seq_lens: Tensor, query_start: Tensor,
                            scale: float, latent_dim: int, max_query_len: int,
                            tree_ancestors: Tensor | None = None) -> Tensor:
    """Triton backend of `paged_latent_attention`'s core (inputs validated by the dispatcher):
    q [T, H, R + ROPE], cache [P, page_size, R + ROPE] -> [T, H, R]; `tree_ancestors` as paged
    attention's."""
    T, H, width = q.shape
    page = cache.shape[1]
    block_r = max(16, next_power_of_2(latent_dim))
    block_m = _tile_rows(H, max_query_len, block_r)
    tiles = cdiv(max_query_len, block_m // H)
    splits = _num_splits(seq_lens.shape[0] * tiles, q.device) if max_query_len == 1 else 1
    rope = width - latent_dim
    if splits == 1:
        o, lse = torch.empty(1, T, H, latent_dim, dtype=q.dtype, device=q.device), q  # lse unread
    else:
        o = torch.empty(splits, T, H, latent_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(splits, T, H, dtype=torch.float32, device=q.device)
    _latent_attention_kernel[(seq_lens.shape[0], tiles, splits)](
        q, cache, o, lse, block_tables, seq_lens, query_start,
        query_start if tree_ancestors is None else tree_ancestors, scale * LOG2E,  # unread without TREE
        q.stride(0), q.stride(1), cache.stride(0), cache.stride(1), block_tables.stride(0),
        o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
        H=H, R=latent_dim, ROPE=rope, BLOCK_R=block_r, BLOCK_ROPE=max(16, next_power_of_2(rope)), PAGE=page,
        BLOCK_N=min(page, 32), BLOCK_M=block_m, SPLITS=splits, TREE=tree_ancestors is not None,
        num_warps=8 if block_m * block_r >= ACCUMULATOR else 4,
    )
    return o[0] if splits == 1 else _combine(o, lse).to(q.dtype)
