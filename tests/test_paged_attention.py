"""Paged attention: the gather-then-SDPA reference against an explicit softmax, and the Triton
kernel against the reference in float64. Without a GPU the kernel runs in Triton's interpreter
(set up in conftest.py)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import INTERPRET

triton = pytest.importorskip("triton")

from ringlinear.ops.paged_attention import paged_attention, paged_attention_reference  # noqa: E402
from ringlinear.ops.paged_attention.kernel import paged_attention_triton  # noqa: E402
from ringlinear.ops.policy import KernelPolicy  # noqa: E402
from ringlinear.ops.tree import tree_ancestors  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"


def paged_case(q_lens, seq_lens, H, KV, D, page, dtype, seed=0):
    """Random queries and caches; each sequence's pages are scattered over the pool in random order."""
    gen = torch.Generator().manual_seed(seed)
    pages_per_seq = [-(-n // page) for n in seq_lens]
    num_pages = sum(pages_per_seq) + 3
    order = torch.randperm(num_pages, generator=gen).tolist()
    tables = torch.zeros(len(seq_lens), max(pages_per_seq), dtype=torch.int32)
    for n, count in enumerate(pages_per_seq):
        tables[n, :count] = torch.tensor([order.pop() for _ in range(count)])
    k_cache, v_cache = (torch.randn(num_pages, page, KV, D, generator=gen) for _ in range(2))
    q = torch.randn(sum(q_lens), H, D, generator=gen)
    query_start = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return [x.to(DEVICE, dtype) for x in (q, k_cache, v_cache)] + [tables.to(DEVICE), lens.to(DEVICE),
                                                                    query_start.to(DEVICE)]


def explicit(q, k_cache, v_cache, tables, seq_lens, query_start, scale):
    """Per query token: softmax over the keys at positions up to its own, written out."""
    page, KV = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    for n, length in enumerate(seq_lens.tolist()):
        start, end = query_start[n].item(), query_start[n + 1].item()
        positions = torch.arange(length)
        slots = tables[n, positions // page].long()
        k, v = k_cache[slots, positions % page], v_cache[slots, positions % page]  # [L, KV, D]
        for i, token in enumerate(range(start, end)):
            pos = length - (end - start) + i
            for h in range(q.shape[1]):
                g = h // (q.shape[1] // KV)
                weights = torch.softmax(k[: pos + 1, g] @ q[token, h] * scale, dim=0)
                out[token, h] = weights @ v[: pos + 1, g]
    return out


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_reference_is_causal_attention_over_the_pages():
    case = paged_case([1, 5, 3], [9, 5, 20], H=4, KV=2, D=8, page=4, dtype=torch.float64)
    case = [x.cpu() for x in case]
    assert rel(paged_attention_reference(*case, scale=0.3), explicit(*case, scale=0.3)) < 1e-12


@pytest.mark.parametrize("q_lens,seq_lens,H,KV,D,dtype", [
    ([1, 1, 1], [1, 37, 16], 4, 1, 32, torch.float32),           # decode, GQA 4, a page boundary
    ([1, 30, 7, 1], [17, 30, 50, 64], 4, 2, 32, torch.float32),  # decodes with a fresh prompt and chunks
    ([40, 3], [40, 19], 2, 2, 16, torch.float32),                # MHA, several query tiles
    ([1, 12], [70, 33], 8, 2, 64, torch.bfloat16),
])
def test_triton_kernel_matches_the_reference(q_lens, seq_lens, H, KV, D, dtype):
    q, k_cache, v_cache, tables, lens, starts = paged_case(q_lens, seq_lens, H, KV, D, page=16, dtype=dtype)
    scale = D**-0.5
    out = paged_attention_triton(q, k_cache, v_cache, tables, lens, starts, scale, max(q_lens))
    ref = paged_attention_reference(q.double(), k_cache.double(), v_cache.double(), tables, lens, starts, scale)
    assert out.dtype == dtype and torch.isfinite(out).all()
    # On the GPU tl.dot runs fp32 operands as TF32 (10-bit mantissa); the interpreter is exact.
    fp32_tol = 2e-3 if q.is_cuda else 1e-5
    assert rel(out, ref) < (fp32_tol if dtype == torch.float32 else 1e-2)


def test_dispatch_checks_shapes():
    q, k_cache, v_cache, tables, lens, starts = paged_case([1], [5], 4, 2, 8, page=4, dtype=torch.float32)
    with pytest.raises(ValueError, match="divide"):
        paged_attention(q[:, :3], k_cache, v_cache, tables, lens, starts, 1.0, 1)
    with pytest.raises(ValueError, match="query_start"):
        paged_attention(q, k_cache, v_cache, tables, lens, starts[:1], 1.0, 1)
    with pytest.raises(ValueError, match="backend must be one of"):
        paged_attention(q, k_cache, v_cache, tables, lens, starts, 1.0, 1, policy=KernelPolicy("cuda"))


# -- draft trees (ops.tree): the new tokens attend to the cached prefix and their ancestors-or-self --

TREES = ([-1, 0, 0, 1, 2], [-1, 0, 1, 1, 0, 4, 5, 5, 2, 3, 6, 7, 9, 9, 11, 12], [-1])  # sizes 5, 16, 1


def tree_case(prefixes, dtype):
    sizes = [len(t) for t in TREES]
    case = paged_case(sizes, [p + m for p, m in zip(prefixes, sizes)], H=4, KV=2, D=16, page=16, dtype=dtype)
    parents = torch.tensor([p for t in TREES for p in t], device=DEVICE)
    return case, tree_ancestors(parents, case[-1], max(sizes))[0], max(sizes)


def tree_mask(parents: list[int], length: int) -> torch.Tensor:
    """[m, length] for a tree of m tokens after a cached prefix: the prefix, then each token's
    ancestors-or-self, written out from the parents."""
    m = len(parents)
    mask = torch.zeros(m, length, dtype=torch.bool)
    mask[:, : length - m] = True
    for i in range(m):
        j = i
        while j >= 0:
            mask[i, length - m + j], j = True, parents[j]
    return mask


def dense_tree_attention(q, k_cache, v_cache, tables, seq_lens, query_start, scale):
    """float64 SDPA over each sequence's gathered keys with the mask written out from the parents."""
    page, H, KV = k_cache.shape[1], q.shape[1], k_cache.shape[2]
    out = torch.empty(q.shape, dtype=torch.float64)
    for n, (length, parents) in enumerate(zip(seq_lens.tolist(), TREES)):
        start, m = int(query_start[n]), len(parents)
        positions = torch.arange(length)
        slots = tables[n, positions // page].long().cpu()
        k, v = (c.cpu().double()[slots, positions % page].repeat_interleave(H // KV, 1) for c in (k_cache, v_cache))
        mask = tree_mask(parents, length)
        queries = q[start:start + m].cpu().double().transpose(0, 1)
        o = F.scaled_dot_product_attention(queries, k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale)
        out[start:start + m] = o.transpose(0, 1)
    return out


@pytest.mark.parametrize("policy,dtype,tol", [(KernelPolicy("torch"), torch.float64, 1e-12),
                                              (KernelPolicy("triton"), torch.float32, 1e-5),
                                              (KernelPolicy("triton"), torch.bfloat16, 2e-2)])
def test_tree_attention_matches_dense_masked_sdpa(policy, dtype, tol):
    case, ancestors, max_len = tree_case([20, 3, 40], dtype)
    o = paged_attention(*case, 0.3, max_len, policy=policy, tree_ancestors=ancestors)
    assert rel(o.cpu(), dense_tree_attention(*case, 0.3)) < tol


def test_a_chain_is_causal_attention():
    case, _, _ = tree_case([20, 3, 40], torch.float32)
    sizes = [len(t) for t in TREES]
    chains = torch.tensor([p for m in sizes for p in range(-1, m - 1)], device=DEVICE)
    ancestors = tree_ancestors(chains, case[-1], max(sizes))[0]
    for policy in (KernelPolicy("torch"), KernelPolicy("triton")):
        tree = paged_attention(*case, 0.3, max(sizes), policy=policy, tree_ancestors=ancestors)
        assert rel(tree, paged_attention(*case, 0.3, max(sizes), policy=policy)) < 1e-6


def root_path_decodes(q, k_cache, v_cache, tables, seq_lens, query_start):
    """Each tree token as a decode step of its root path: one query after the cached prefix and its
    ancestors, laid out as a sequence of its own on fresh pages of 16 (another paging than the tree's)."""
    page, new_page = k_cache.shape[1], 16
    rows_k, rows_v, lengths = [], [], []
    for n, (length, parents) in enumerate(zip(seq_lens.tolist(), TREES)):
        prefix = length - len(parents)
        for i in range(len(parents)):
            path, j = [], i
            while j >= 0:
                path, j = [j] + path, parents[j]
            positions = torch.tensor(list(range(prefix)) + [prefix + j for j in path], device=q.device)
            slots = tables[n, positions // page].long()
            for rows, cache in ((rows_k, k_cache), (rows_v, v_cache)):
                entries = cache[slots, positions % page]
                pad = -len(entries) % new_page
                rows.append(torch.cat([entries, entries.new_zeros(pad, *entries.shape[1:])]).view(-1, new_page,
                                                                                                  *entries.shape[1:]))
            lengths.append(len(positions))
    pages = [r.shape[0] for r in rows_k]
    first = torch.tensor([0, *pages[:-1]]).cumsum(0)
    table = torch.zeros(len(pages), max(pages), dtype=torch.int32)
    for t, (start, count) in enumerate(zip(first.tolist(), pages)):
        table[t, :count] = torch.arange(start, start + count)
    return (q, torch.cat(rows_k), torch.cat(rows_v), table.to(q.device),
            torch.tensor(lengths, dtype=torch.int32, device=q.device),
            torch.arange(len(lengths) + 1, dtype=torch.int32, device=q.device))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_invariant_trees_give_each_token_its_root_path_decode_bits(backend):
    """Under an invariant policy a tree token's output is, bit for bit, the decode step of its root path
    (what a non-speculative engine computes for that token), and close to the dense masked form."""
    policy = KernelPolicy(backend, invariant=True)
    case, ancestors, max_len = tree_case([20, 3, 40], torch.float32)
    o = paged_attention(*case, 0.3, max_len, policy=policy, tree_ancestors=ancestors)
    assert rel(o.cpu(), dense_tree_attention(*case, 0.3)) < 1e-5
    decodes = root_path_decodes(*case)
    assert torch.equal(o, paged_attention(*decodes, 0.3, 1, policy=policy))


def test_trees_have_a_size_limit():
    case, ancestors, max_len = tree_case([20, 3, 40], torch.float32)
    with pytest.raises(ValueError, match="tree_ancestors"):
        paged_attention(*case, 0.3, max_len, tree_ancestors=ancestors[1:])
