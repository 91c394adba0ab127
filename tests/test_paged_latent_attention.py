"""Absorbed MLA attention over paged latents: the absorbed form against the decompressed one
(keys and values expanded into heads, then causal attention) in float64, and the Triton kernel
against the reference. Without a GPU the kernel runs in Triton's interpreter (conftest.py)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import INTERPRET
from test_paged_attention import tree_mask

triton = pytest.importorskip("triton")

from ringlinear.model.mla import decompress
from ringlinear.ops.attention import causal_attention
from ringlinear.ops.paged_latent_attention import latent_attention_reference, paged_latent_attention
from ringlinear.ops.paged_latent_attention.kernel import latent_attention_triton
from ringlinear.ops.policy import KernelPolicy
from ringlinear.ops.tree import tree_ancestors

DEVICE = "cpu" if INTERPRET else "cuda"
TORCH = KernelPolicy("torch")


def latent_case(q_lens, seq_lens, H, r, rope, width, page, dtype, seed=0):
    """Random absorbed-width queries and a latent cache whose pages are scattered over the pool."""
    gen = torch.Generator().manual_seed(seed)
    pages_per_seq = [-(-n // page) for n in seq_lens]
    num_pages = sum(pages_per_seq) + 2
    order = torch.randperm(num_pages, generator=gen).tolist()
    tables = torch.zeros(len(seq_lens), max(pages_per_seq) + 1, dtype=torch.int32)
    for n, count in enumerate(pages_per_seq):
        tables[n, :count] = torch.tensor([order.pop() for _ in range(count)])
    cache = torch.randn(num_pages, page, r + rope, generator=gen)
    q = torch.randn(sum(q_lens), H, width, generator=gen)
    query_start = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return [x.to(DEVICE, dtype) for x in (q, cache)] + [tables.to(DEVICE), lens.to(DEVICE), query_start.to(DEVICE)]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_absorbed_attention_equals_the_decompressed_form():
    H, r, rope, nope, v = 4, 24, 8, 12, 10
    q, cache, tables, lens, starts = latent_case([1, 6, 3], [9, 6, 21], H, r, rope, nope + rope, page=4,
                                                 dtype=torch.float64)
    kv_b = torch.randn(H * (nope + v), r, dtype=torch.float64)
    out = paged_latent_attention(q, cache, kv_b, tables, lens, starts, 0.3, 6, policy=TORCH)
    expected = []
    for n, length in enumerate(lens.tolist()):
        entries = cache[tables[n, : -(-length // 4)].long()].flatten(0, 1)[:length]
        k, values = decompress(entries[None, :, :r], entries[None, :, r:], kv_b, H, nope)
        expected.append(causal_attention(q[None, starts[n]:starts[n + 1]], k, values, 0.3)[0])
    assert out.shape == (10, H, v) and rel(out, torch.cat(expected)) < 1e-12


@pytest.mark.parametrize("q_lens,seq_lens,H,r,rope,page,dtype", [
    ([1, 1, 1], [1, 37, 80], 4, 64, 32, 16, torch.float32),           # decode, split keys, page boundaries
    ([1, 30, 7, 1], [17, 30, 50, 64], 4, 64, 32, 16, torch.float32),  # decodes with a fresh prompt and chunks
    ([40, 3], [40, 19], 2, 48, 16, 16, torch.float32),                # several query tiles, a non-power-of-2 rank
    ([1, 9], [150, 70], 4, 64, 32, 64, torch.float32),                # two key blocks per page
    ([1, 1], [70, 33], 16, 128, 64, 16, torch.bfloat16),              # decode at 16 heads
])
def test_triton_kernel_matches_the_reference(q_lens, seq_lens, H, r, rope, page, dtype):
    q, cache, tables, lens, starts = latent_case(q_lens, seq_lens, H, r, rope, r + rope, page=page, dtype=dtype)
    scale = 0.1
    out = latent_attention_triton(q, cache, tables, lens, starts, scale, r, max(q_lens))
    ref = latent_attention_reference(q.double(), cache.double(), tables, lens, starts, scale, r)
    assert out.shape == ref.shape and out.dtype == dtype and torch.isfinite(out).all()
    fp32_tol = 2e-3 if q.is_cuda else 1e-5  # TF32 dots on the GPU; the interpreter is exact
    assert rel(out, ref) < (fp32_tol if dtype == torch.float32 else 1e-2)


TREES = ([-1, 0, 0, 1, 2], [-1], [-1, 0, 1, 1, 0, 4])  # parents (ops.tree), after prefixes of PREFIXES
PREFIXES = (9, 30, 2)


def tree_latent_case(H, r, rope, width, page, dtype):
    sizes = [len(t) for t in TREES]
    case = latent_case(sizes, [p + m for p, m in zip(PREFIXES, sizes)], H, r, rope, width, page=page, dtype=dtype)
    parents = torch.tensor([p for t in TREES for p in t], device=DEVICE)
    return case, tree_ancestors(parents, case[-1], max(sizes))[0]


def test_draft_trees_attend_to_the_prefix_and_their_ancestors_in_the_decompressed_form():
    H, r, rope, nope, v = 4, 24, 8, 12, 10
    (q, cache, tables, lens, starts), ancestors = tree_latent_case(H, r, rope, nope + rope, 4, torch.float64)
    kv_b = torch.randn(H * (nope + v), r, dtype=torch.float64)
    out = paged_latent_attention(q, cache, kv_b, tables, lens, starts, 0.3, 6, policy=TORCH,
                                 tree_ancestors=ancestors)
    expected = []
    for n, (length, parents) in enumerate(zip(lens.tolist(), TREES)):
        entries = cache[tables[n, : -(-length // 4)].long()].flatten(0, 1)[:length]
        k, values = decompress(entries[None, :, :r], entries[None, :, r:], kv_b, H, nope)
        queries = q[None, starts[n]:starts[n + 1]].transpose(1, 2)
        o = F.scaled_dot_product_attention(queries, k.transpose(1, 2), values.transpose(1, 2),
                                           attn_mask=tree_mask(parents, length), scale=0.3)
        expected.append(o.transpose(1, 2)[0])
    assert rel(out, torch.cat(expected)) < 1e-12


def test_triton_kernel_masks_draft_trees_as_the_reference():
    (q, cache, tables, lens, starts), ancestors = tree_latent_case(4, 64, 32, 96, 16, torch.float32)
    out = latent_attention_triton(q, cache, tables, lens, starts, 0.1, 64, 6, ancestors)
    ref = latent_attention_reference(q.double(), cache.double(), tables, lens, starts, 0.1, 64, ancestors)
    assert rel(out, ref) < (2e-3 if q.is_cuda else 1e-5)


def test_dispatch_checks_shapes_and_refuses_invariance():
    q, cache, tables, lens, starts = latent_case([1], [5], 4, 24, 8, 20, page=4, dtype=torch.float32)
    kv_b = torch.randn(4 * 22, 24)
    args = (tables, lens, starts, 1.0, 1)
    assert paged_latent_attention(q, cache, kv_b, *args).shape == (1, 4, 10)
    with pytest.raises(ValueError, match="rank"):
        paged_latent_attention(q, cache[..., :24], kv_b, *args)  # no rope key
    with pytest.raises(ValueError, match="query_start"):
        paged_latent_attention(q, cache, kv_b, tables, lens, starts[:1], 1.0, 1)
    with pytest.raises(ValueError, match="batch-invariant"):
        paged_latent_attention(q, cache, kv_b, *args, policy=KernelPolicy(invariant=True))
