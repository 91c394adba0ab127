"""Causal softmax attention with grouped KV heads, over whole or packed sequences."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from .batch_invariant import KEY_BLOCK
from .policy import KernelPolicy, causal_attention_kernel


def document_ids(cu_seqlens: Tensor, seq_len: int) -> Tensor:
    """[T] index of the packed sequence each position belongs to."""
    positions = torch.arange(seq_len, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, cu_seqlens: Tensor | None = None,
                     policy: KernelPolicy = KernelPolicy()) -> Tensor:
    """q: [B, Tq, H, D]; k: [B, Tk, KV, D], v: [B, Tk, KV, Dv] with Tk ≥ Tq and KV dividing H.

    Query i sits at key position Tk - Tq + i (new tokens after a cached prefix) and sees keys up to
    and including its own. With `cu_seqlens` (B = 1, Tq = Tk) a query sees only its own sequence.
    Returns [B, Tq, H, Dv]. `policy` picks the kernel (`ops.policy`). Values narrower than the keys
    (MLA) are zero-padded to D for the kernels that need one head width and cut back after.
    """
    kernel = causal_attention_kernel(policy, q, k, v, packed=cu_seqlens is not None)
    Dv = v.shape[-1]
    if Dv != q.shape[-1] and kernel != "sdpa":
        v = F.pad(v, (0, q.shape[-1] - Dv))
        return _causal_attention(kernel, q, k, v, scale, cu_seqlens, policy)[..., :Dv]
    return _causal_attention(kernel, q, k, v, scale, cu_seqlens, policy)


def _causal_attention(kernel: str, q: Tensor, k: Tensor, v: Tensor, scale: float, cu_seqlens: Tensor | None,
                      policy: KernelPolicy) -> Tensor:
    match kernel:
        case "flash_varlen":
            return _flash_varlen(q, k, v, scale, cu_seqlens)
        case "sdpa":
            return _sdpa(q, k, v, scale, cu_seqlens)
        case "key_blocks":
            return _ByKeyBlocksFunction.apply(q, k, v, scale, cu_seqlens, policy)
        case "key_blocks_reference":
            return _causal_by_key_blocks(q, k, v, scale, cu_seqlens, policy)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float, cu_seqlens: Tensor | None) -> Tensor:
    """PyTorch's scaled_dot_product_attention, with a mask for a cached prefix or packed documents."""
    Tq, Tk = q.shape[1], k.shape[1]
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    gqa = q.shape[1] != k.shape[1]
    if cu_seqlens is None and Tq == Tk:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    elif cu_seqlens is None and Tq == 1:
        o = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    elif cu_seqlens is None and not gqa:  # new tokens after a cached prefix: FlashAttention's causal mask
        Dv = v.shape[-1]
        if q.is_cuda and Dv < q.shape[-1]:
            # MLA's narrower values: padded, FlashAttention runs (2.2x the memory-efficient kernel that
            # takes them as they are, at 16K queries x 128K keys on an H200)
            v = F.pad(v, (0, q.shape[-1] - Dv))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(Tq, Tk), scale=scale)[..., :Dv]
    else:
        key_pos = torch.arange(Tk, device=q.device)
        query_pos = key_pos[Tk - Tq:]
        mask = key_pos[None, :] <= query_pos[:, None]
        if cu_seqlens is not None:
            doc = document_ids(cu_seqlens, Tk)
            mask = mask & (doc[None, :] == doc[Tk - Tq:, None])
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return o.transpose(1, 2)


def _flash_varlen(q: Tensor, k: Tensor, v: Tensor, scale: float, cu_seqlens: Tensor) -> Tensor:
    """Packed documents on CUDA through FlashAttention's varlen kernel (GQA native, differentiable);
    the aten op is what `torch.nn.attention.varlen` wraps, and its signature is stable across the
    PyTorch versions we support while the wrapper's is not."""
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    o = torch.ops.aten._flash_attention_forward(q[0], k[0], v[0], cu, cu, longest, longest, 0.0, True, False,
                                                scale=scale)[0]
    return o[None]


def attention_by_key_blocks(q: Tensor, k_pages: Tensor, v_pages: Tensor, page_table: Tensor, key_offset: Tensor,
                            seq_lens: Tensor, query_start: Tensor, scale: float, policy: KernelPolicy) -> Tensor:
    """Causal attention whose arithmetic per query is fixed by the query alone (batch-invariant).

    q [T, H, D]: the new queries of N sequences, rows `query_start[n]:query_start[n + 1]` ([N+1]) for
    sequence n, its last ones: of its `seq_lens[n]` ([N]) keys, query t sits at position
    seq_lens[n] - query_start[n + 1] + t and sees keys up to its own. Key x of sequence n is row
    key_offset[n] + page_table[n, x // page] · page + x % page of k_pages, v_pages [P, page, KV, D]
    viewed as [P · page, KV, D]: engine pages (key_offset 0), or whole sequences as one page each.

    An online softmax visits the keys in blocks of KEY_BLOCK at fixed positions from the sequence's
    start, in order j = 0, 1, ..., and blocks wholly past a query change nothing, so neither the other
    queries of the call nor how the sequence was split into calls (a training forward, prefill chunks,
    decode steps) change a bit; nor does the paging, which only says where a key is read from. Returns
    [T, H, D] in q's dtype; the work is in fp32 (fp64 for fp64 inputs). On the Triton backend fp16,
    bf16 and fp32 take a Triton kernel on the tensor cores (`invariant_kernels.key_block_attention`;
    not differentiable: `causal_attention` wraps it); the rest this loop over blocks."""
    if q.dim() != 3 or k_pages.dim() != 4 or v_pages.shape != k_pages.shape:
        raise ValueError(f"q must be [T, H, D] and the key/value pages [P, page, KV, D], got {list(q.shape)}, "
                         f"{list(k_pages.shape)}, {list(v_pages.shape)}")
    (T, H, D), KV, N = q.shape, k_pages.shape[2], seq_lens.shape[0]
    if k_pages.shape[3] != D or H % KV:
        raise ValueError(f"KV heads {KV} must divide query heads {H} and head dims must match, got q "
                         f"{list(q.shape)}, pages {list(k_pages.shape)}")
    if k_pages.dtype != q.dtype or v_pages.dtype != q.dtype:
        raise ValueError(f"q and the pages must share a dtype, got {q.dtype}, {k_pages.dtype}, {v_pages.dtype}")
    if page_table.dim() != 2 or page_table.shape[0] != N or key_offset.shape != (N,) or query_start.shape != (N + 1,):
        raise ValueError(f"page_table must be [N, max_pages], key_offset [N] and query_start [N+1] for N={N} "
                         f"sequences (seq_lens), got {list(page_table.shape)}, {list(key_offset.shape)} and "
                         f"{list(query_start.shape)}")
    page_table, key_offset, seq_lens, query_start = (
        x.contiguous() for x in (page_table, key_offset, seq_lens, query_start))
    if policy.triton(q, k_pages, v_pages):
        from .invariant_kernels import key_block_attention
        return key_block_attention(q, k_pages, v_pages, page_table, key_offset, seq_lens, query_start, scale)
    dtype, page, KB = q.dtype, k_pages.shape[1], KEY_BLOCK
    work = torch.promote_types(dtype, torch.float32)
    heads = torch.arange(H, device=q.device) // (H // KV)
    seq = torch.repeat_interleave(torch.arange(N, device=q.device), query_start[1:] - query_start[:-1],
                                  output_size=T)
    positions = (seq_lens - query_start[1:])[seq] + torch.arange(T, device=q.device)
    k_rows, v_rows = k_pages.flatten(0, 1), v_pages.flatten(0, 1)
    q = q.to(work)[:, :, None, :]  # [T, H, 1, D]
    m = torch.full((T, H), float("-inf"), dtype=work, device=q.device)
    total = torch.zeros(T, H, dtype=work, device=q.device)
    acc = torch.zeros(T, H, D, dtype=work, device=q.device)
    offsets = torch.arange(KB, device=q.device)
    for j in range(int(positions.max()) // KB + 1 if T else 0):
        x = j * KB + offsets
        present = x < seq_lens[seq, None]  # [T, KB]: keys past the sequence are not read
        pages = page_table[seq[:, None], (x // page).clamp_max(page_table.shape[1] - 1)]
        rows = torch.where(present, key_offset[seq, None] + pages * page + x % page, 0)
        keys, values = (r[rows][:, :, heads].to(work).masked_fill(~present[:, :, None, None], 0).transpose(1, 2)
                        for r in (k_rows, v_rows))  # [T, H, KB, D]
        scores = (q @ keys.transpose(-1, -2))[:, :, 0] * scale  # [T, H, KB]
        visible = x <= positions[:, None]  # [T, KB]; block 0 always holds key 0
        scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
        m_new = torch.maximum(m, scores.amax(-1))
        p = torch.exp(scores - m_new[..., None])
        alpha = torch.exp(m - m_new)
        total = total * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + (p[:, :, None, :] @ values)[:, :, 0]
        m = m_new
    return (acc / total[..., None]).to(dtype)


def _causal_by_key_blocks(q: Tensor, k: Tensor, v: Tensor, scale: float, cu_seqlens: Tensor | None,
                          policy: KernelPolicy) -> Tensor:
    """`causal_attention` through `attention_by_key_blocks`: each sequence (or packed document) one page
    of its keys, read in place, its blocks counted from its first position."""
    if cu_seqlens is not None:  # B = 1, Tq = Tk: the documents are the sequences, their keys one page
        cu = cu_seqlens.to(q.device, torch.long)
        lengths = cu[1:] - cu[:-1]
        table = torch.zeros(len(lengths), 1, dtype=torch.long, device=q.device)
        return attention_by_key_blocks(q[0], k, v, table, cu[:-1], lengths, cu, scale, policy)[None]
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    table = torch.arange(B, device=q.device)[:, None]  # sequence b is page b
    query_start = torch.arange(B + 1, device=q.device) * Tq
    no_offset = torch.zeros(B, dtype=torch.long, device=q.device)
    o = attention_by_key_blocks(q.reshape(B * Tq, H, D), k, v, table, no_offset, torch.full((B,), Tk, device=q.device),
                                query_start, scale, policy)
    return o.view(B, Tq, H, D)


class _ByKeyBlocksFunction(torch.autograd.Function):
    """`_causal_by_key_blocks` forward (on the kernel); the gradient is that of the same function
    computed the ordinary way (SDPA), recomputed in the backward, which needs no invariance."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float, cu_seqlens: Tensor | None,
                policy: KernelPolicy) -> Tensor:
        ctx.save_for_backward(q, k, v, cu_seqlens)
        ctx.scale = scale
        return _causal_by_key_blocks(q, k, v, scale, cu_seqlens, policy)

    @staticmethod
    def backward(ctx, do: Tensor):
        q, k, v, cu_seqlens = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_() for x in (q, k, v)]
            o = causal_attention(*leaves, ctx.scale, cu_seqlens)  # the fast kernels of this device
        return *torch.autograd.grad(o, leaves, do), None, None, None
