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


def attention_by_key_blocks(q: Tensor, k_blocks: Tensor, v_blocks: Tensor, block_table: Tensor, positions: Tensor,
                            scale: float, policy: KernelPolicy) -> Tensor:
    """Causal attention whose arithmetic per query is fixed by the query alone (batch-invariant).

    q [T, H, D]: queries of any sequences; query t sits at `positions[t]` of its sequence, whose keys
    0, 1, ... lie in blocks of KB: block j is `k_blocks[block_table[t, j]]` ([P, KB, KV, D], likewise
    `v_blocks`). An online softmax visits the blocks in order j = 0, 1, ..., and blocks wholly past
    the query change nothing, so how many blocks the other queries need does not matter. Returns
    [T, H, D] in q's dtype; the work is in fp32 (fp64 for fp64 inputs). On the Triton backend fp16,
    bf16 and fp32 take a Triton kernel (one launch; not differentiable: `causal_attention` wraps it);
    the rest this loop over blocks."""
    if policy.triton(q, k_blocks, v_blocks):
        from .invariant_kernels import key_block_attention
        return key_block_attention(q, k_blocks, v_blocks, block_table, positions, scale)
    (T, H, D), dtype = q.shape, q.dtype
    KB, KV = k_blocks.shape[1], k_blocks.shape[2]
    work = torch.promote_types(dtype, torch.float32)
    heads = torch.arange(H, device=q.device) // (H // KV)
    q = q.to(work)[:, :, None, :]  # [T, H, 1, D]
    m = torch.full((T, H), float("-inf"), dtype=work, device=q.device)
    total = torch.zeros(T, H, dtype=work, device=q.device)
    acc = torch.zeros(T, H, D, dtype=work, device=q.device)
    offsets = torch.arange(KB, device=q.device)
    for j in range(int(positions.max()) // KB + 1 if T else 0):
        keys, values = (x[block_table[:, j]][:, :, heads].to(work).transpose(1, 2) for x in (k_blocks, v_blocks))
        scores = (q @ keys.transpose(-1, -2))[:, :, 0] * scale  # [T, H, KB]
        visible = j * KB + offsets <= positions[:, None]  # [T, KB]; block 0 always holds key 0
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
    """`causal_attention` through `attention_by_key_blocks`: each sequence's keys cut into blocks
    from its first position on."""
    if cu_seqlens is not None:
        return _packed_by_key_blocks(q, k, v, scale, cu_seqlens, policy)
    B, Tq, H, D = q.shape
    Tk, KV = k.shape[1], k.shape[2]
    KB = KEY_BLOCK
    nb = -(-Tk // KB)
    pad = (0, 0, 0, 0, 0, nb * KB - Tk)
    k_blocks, v_blocks = (F.pad(x, pad).reshape(B * nb, KB, KV, D) for x in (k, v))
    block_table = (torch.arange(B, device=q.device)[:, None] * nb + torch.arange(nb, device=q.device))
    block_table = block_table.repeat_interleave(Tq, dim=0)  # [B*Tq, nb]
    positions = torch.arange(Tk - Tq, Tk, device=q.device).repeat(B)
    o = attention_by_key_blocks(q.reshape(B * Tq, H, D), k_blocks, v_blocks, block_table, positions, scale, policy)
    return o.view(B, Tq, H, D)


def _packed_by_key_blocks(q: Tensor, k: Tensor, v: Tensor, scale: float, cu_seqlens: Tensor,
                          policy: KernelPolicy) -> Tensor:
    """Packed documents (B = 1) in one call, built on the device: each document's keys are laid out
    in blocks from its own start (its last block zero-padded), a query's block-table row lists its
    document's blocks and its position counts from the document's start, so it visits the blocks (and
    gets the bits) of its document run alone."""
    T, KV, D = k.shape[1], k.shape[2], k.shape[3]
    KB = KEY_BLOCK
    cu = cu_seqlens.to(q.device, torch.long)
    blocks = (cu[1:] - cu[:-1] + KB - 1) // KB  # per document
    first_block = blocks.cumsum(0) - blocks
    doc = document_ids(cu, T)
    positions = torch.arange(T, device=q.device) - cu[doc]
    # Σ ceil(n_i / KB) ≤ (T + N (KB - 1)) / KB: a bound from the shapes alone (no host sync)
    num_blocks = (T + (cu.shape[0] - 1) * (KB - 1)) // KB
    rows = first_block[doc] * KB + positions  # each key's row in the blocks
    k_blocks, v_blocks = (x.new_zeros(num_blocks * KB, KV, D).index_copy(0, rows, x[0]).view(num_blocks, KB, KV, D)
                          for x in (k, v))
    # a document has at most ceil(T / KB) blocks; entries past a query's own are never read but must index
    table = (first_block[doc, None] + torch.arange(-(-T // KB), device=q.device)).clamp_max(num_blocks - 1)
    return attention_by_key_blocks(q[0], k_blocks, v_blocks, table, positions, scale, policy)[None]


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
