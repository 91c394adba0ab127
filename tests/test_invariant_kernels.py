"""The Triton kernels of batch-invariant mode (`ops.invariant_kernels`) against PyTorch: values,
gradients, and a row's bits alone against the same row among others.

Without a GPU the kernels run in Triton's interpreter (set up in conftest.py) on CPU tensors, so the
bit-identity checks here test the kernels' logic (tiles, groups, masks), not the GPU's arithmetic:
benchmarks/check_invariant.py does that on CUDA. Shapes are small: the interpreter is slow.
"""

import pytest
import torch
from conftest import INTERPRET

triton = pytest.importorskip("triton")

from ringlinear import SequenceContext  # noqa: E402
from ringlinear.ops import attention  # noqa: E402
from ringlinear.ops.batch_invariant import numerics  # noqa: E402
from ringlinear.ops.invariant_kernels import invariant_grouped_mm, invariant_linear, row_sum, softmax  # noqa: E402
from ringlinear.ops.policy import KernelPolicy  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
ALIGNED = KernelPolicy("triton", invariant=True)  # the invariant kernels, through the interpreter on a CPU


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def grouped_reference(x, w, counts):
    return torch.cat([rows @ w_e.T for rows, w_e in zip(x.split(counts.tolist()), w)])


# -- grouped GEMM ----------------------------------------------------------------------------------

COUNTS = [3, 0, 70, 1, 0, 5, 0]  # empty groups (one last), a group of one, one over two row tiles


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_grouped_mm_matches_torch(dtype, tol):
    counts = torch.tensor(COUNTS, device=DEVICE)
    x, w = randn(sum(COUNTS), 72, dtype=dtype), randn(len(COUNTS), 136, 72, seed=1, dtype=dtype)
    out = invariant_grouped_mm(x, w, counts)
    ref = grouped_reference(x.double(), w.double(), counts)
    assert out.dtype == dtype and out.shape == (sum(COUNTS), 136)
    assert torch.allclose(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    ref = x.double() @ w[0].double().T
    one_group = invariant_grouped_mm(x, w[:1], torch.tensor([sum(COUNTS)], device=DEVICE))
    for single in (one_group, invariant_linear(x, w[0])):
        assert torch.allclose(single.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_grouped_mm_rows_do_not_depend_on_the_other_rows(row_by_row_dot):
    x, w = randn(70, 40), randn(4, 24, 40, seed=1)
    together = invariant_grouped_mm(x, w, torch.tensor([5, 0, 60, 5], device=DEVICE))
    alone = invariant_grouped_mm(x[5:65], w[2:3], torch.tensor([60], device=DEVICE))
    assert torch.equal(together[5:65], alone)
    # the same rows after 2 other rows of their group (another split into tiles) and other groups
    shifted = invariant_grouped_mm(torch.cat([x[:7], x[65:67], x[5:65], x[67:69]]), w,
                                   torch.tensor([7, 0, 62, 2], device=DEVICE))
    assert torch.equal(shifted[9:69], alone)
    lone_rows = [invariant_linear(x[i:i + 1], w[1]) for i in (0, 37, 69)]
    assert all(torch.equal(row[0], invariant_linear(x, w[1])[i]) for row, i in zip(lone_rows, (0, 37, 69)))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_k_slices_give_a_row_its_bits_in_either_form(dtype, tol, row_by_row_dot):
    """K = 520 in three slices, a choice of the weight's shape alone: a product whose tiles would leave the
    GPU idle runs a program per slice and then sums the slices; a larger one sums them in its programs.
    Both match float64 and give the same bits, so a row alone (split) is the row among 150 (summed in place)."""
    from ringlinear.ops.invariant_kernels import _grouped_mm, k_slices
    assert k_slices(1, 136, 520) == (3, 192) and k_slices(1, 136, 72) == (1, 128)
    assert k_slices(1, 2**17, 2048)[0] == 1 and k_slices(8, 136, 520)[0] == 1  # a wide product; experts
    x, w = randn(150, 520, dtype=dtype), randn(136, 520, seed=1, dtype=dtype)
    split, summed = (_grouped_mm(x, w[None], None, split=split) for split in (True, False))
    ref = x.double() @ w.double().T
    assert torch.allclose(summed.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    assert torch.equal(split, summed)
    for row in (0, 77, 149):
        assert torch.equal(invariant_linear(x[row:row + 1], w)[0], summed[row])


@pytest.mark.parametrize("kernel", ["loop", "grouped_mm"])
def test_grouped_mm_gradients_match_torch(kernel, monkeypatch):
    """Both backward forms (torch._grouped_mm, CUDA bf16's, runs here on torch's CPU fallback in fp32)."""
    import ringlinear.ops.invariant_kernels as kernels
    monkeypatch.setattr(kernels, "grouped_mm_gradients_kernel", lambda dy: kernel)
    counts = torch.tensor(COUNTS, device=DEVICE)
    x, w = randn(sum(COUNTS), 40).requires_grad_(), randn(len(COUNTS), 24, 40, seed=1).requires_grad_()
    dy = randn(sum(COUNTS), 24, seed=2)
    grads = torch.autograd.grad((invariant_grouped_mm(x, w, counts) * dy).sum(), [x, w])
    ref = torch.autograd.grad((grouped_reference(x, w, counts) * dy).sum(), [x, w])
    for a, b in zip(grads, ref):
        assert torch.allclose(a, b, atol=1e-5)
    weight = w[0].detach().requires_grad_()
    grads = torch.autograd.grad((invariant_linear(x[None], weight) * dy).sum(), [x, weight])
    ref = torch.autograd.grad((x @ weight.T * dy).sum(), [x, weight])
    for a, b in zip(grads, ref):
        assert torch.allclose(a, b, atol=1e-5)


def test_grouped_mm_rejects_bad_inputs():
    x, w = randn(4, 8), randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"\[E, N, K\]"):
        invariant_grouped_mm(x, w[:, :, :4], torch.tensor([4, 0], device=DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        invariant_grouped_mm(x.double(), w.double(), torch.tensor([4, 0], device=DEVICE))
    with pytest.raises(ValueError, match="counts"):
        invariant_grouped_mm(x, w, torch.tensor([4.0, 0.0], device=DEVICE))
    with pytest.raises(ValueError, match="one group"):
        invariant_grouped_mm(x, w)


# -- row sums and softmax --------------------------------------------------------------------------

@pytest.mark.parametrize("columns", [7, 1500, 9000])  # one partial block; a loop of two; two chunks
def test_row_sums_and_softmax_match_torch_and_a_row_alone(columns):
    x = randn(2, 3, columns) * 3
    # fp32 sums against float64, within fp32's error bound on the sum of |x| (the sums cancel)
    bound = 2 * columns * 2**-24 * x.abs().double().sum(-1)
    for ours, ref, scale in ((row_sum(x), x.double().sum(-1), 1),
                             (row_sum(x, mean=True), x.double().mean(-1), columns)):
        assert ours.shape == ref.shape and ((ours.double() - ref).abs() <= bound / scale).all()
    for ours, ref in ((softmax(x), x.softmax(-1)), (softmax(x, log=True), x.log_softmax(-1))):
        assert ours.shape == ref.shape and torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)
    for fn in (row_sum, softmax, lambda rows: softmax(rows, log=True)):
        assert torch.equal(fn(x[1, 2:]), fn(x)[1, 2:])
        assert torch.equal(fn(x[0, 1]), fn(torch.cat([x[1], x[0]]))[4])


def test_softmax_dtypes():
    x = randn(3, 50, dtype=torch.bfloat16)
    out = softmax(x)
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), x.float().softmax(-1), atol=4e-3)
    out = softmax(x, log=True, dtype=torch.float32)
    assert out.dtype == torch.float32 and torch.allclose(out, x.log_softmax(-1, dtype=torch.float32), atol=1e-5)
    assert row_sum(x).dtype == torch.bfloat16


def test_softmax_of_masked_rows_matches_torch():
    """Rows with -inf (filtered logits), a chunk of them only, and a long row's chunks combined."""
    x = randn(3, 9000) * 4
    x[0, :8192] = float("-inf")  # the first chunk -inf only
    x[1, ::3] = float("-inf")
    for log in (False, True):
        ref = x.log_softmax(-1) if log else x.softmax(-1)
        ours = softmax(x, log=log)
        assert torch.equal(ours.isinf(), ref.isinf()) and torch.allclose(ours, ref, atol=1e-6, rtol=1e-5)


def test_row_sum_and_softmax_gradients_match_torch():
    x = (randn(4, 300) * 2).requires_grad_()
    dy = randn(4, 300, seed=1)
    cases = [(lambda t: row_sum(t)[:, None] * dy, lambda t: t.sum(-1, keepdim=True) * dy),
             (lambda t: row_sum(t, mean=True)[:, None] * dy, lambda t: t.mean(-1, keepdim=True) * dy),
             (lambda t: softmax(t) * dy, lambda t: t.softmax(-1) * dy),
             (lambda t: softmax(t, log=True) * dy, lambda t: t.log_softmax(-1) * dy)]
    for ours, ref in cases:
        a, = torch.autograd.grad(ours(x).sum(), x)
        b, = torch.autograd.grad(ref(x).sum(), x)
        assert torch.allclose(a, b, atol=1e-5)


# -- attention over key blocks ---------------------------------------------------------------------

LOOP = KernelPolicy("torch", invariant=True)  # attention_by_key_blocks' PyTorch loop
SCALE = 0.2


def scattered_pages(sequences, page, seed=0):
    """The keys and values of sequences ([L, KV, D] each) in pages of `page` tokens scattered over a
    pool in random order; every slot no sequence holds is NaN (a page may hold anything past a
    sequence's end). Returns k_pages, v_pages [P, page, KV, D] and the page table [N, max_pages]."""
    gen = torch.Generator().manual_seed(seed)
    counts = [-(-len(k) // page) for k, _ in sequences]
    order = torch.randperm(sum(counts) + 2, generator=gen).tolist()
    KV, D = sequences[0][0].shape[1:]
    pools = [torch.full((sum(counts) + 2, page, KV, D), float("nan"), dtype=sequences[0][0].dtype, device=DEVICE)
             for _ in range(2)]
    table = torch.zeros(len(sequences), max(counts), dtype=torch.int32)
    for n, (count, kv) in enumerate(zip(counts, sequences)):
        for i in range(count):
            table[n, i] = order.pop()
            for pool, x in zip(pools, kv):
                part = x[i * page:(i + 1) * page]
                pool[table[n, i], :len(part)] = part
    return *pools, table.to(DEVICE)


def paged_call(q_parts, sequences, page, policy, seed=0):
    """attention_by_key_blocks over pages: sequence n's new queries q_parts[n] ([t_n, H, D], its last
    t_n positions) against its keys and values sequences[n] = (k, v), [L_n, KV, D] each."""
    k_pages, v_pages, table = scattered_pages(sequences, page, seed)
    lens = [len(q) for q in q_parts]
    query_start = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=DEVICE)
    seq_lens = torch.tensor([len(k) for k, _ in sequences], device=DEVICE)
    offsets = torch.zeros(len(sequences), dtype=torch.long, device=DEVICE)
    return attention.attention_by_key_blocks(torch.cat(q_parts), k_pages, v_pages, table, offsets, seq_lens,
                                             query_start, SCALE, policy)


def explicit(q, k, v):
    """float64: the last len(q) queries of a sequence of len(k) keys, each a softmax over the keys up
    to its own, written out."""
    G = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(G, dim=1) for x in (k, v))
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for i in range(len(q)):
        pos = len(k) - len(q) + i
        weights = torch.softmax(torch.einsum("hd,khd->hk", q[i].double(), k[:pos + 1]) * SCALE, dim=-1)
        out[i] = torch.einsum("hk,khd->hd", weights, v[:pos + 1])
    return out


def sequence(L, H, KV, D, seed, dtype=torch.float32):
    return randn(L, H, D, seed=seed, dtype=dtype), (randn(L, KV, D, seed=seed + 1, dtype=dtype),
                                                    randn(L, KV, D, seed=seed + 2, dtype=dtype))


@pytest.mark.parametrize("H,KV,D,dtype,tol", [(2, 2, 16, torch.float32, 1e-5), (4, 2, 32, torch.float32, 1e-5),
                                              (8, 2, 64, torch.float32, 1e-5), (6, 2, 32, torch.float32, 1e-5),
                                              (4, 1, 16, torch.bfloat16, 2e-2)],
                         ids=["G1-D16", "G2-D32", "G4-D64", "G3-D32", "G4-D16-bf16"])
@pytest.mark.parametrize("policy", [ALIGNED, LOOP], ids=["kernel", "loop"])
def test_key_block_attention_over_scattered_pages_matches_float64(policy, H, KV, D, dtype, tol):
    """A prefill of a whole sequence, a chunk after a cached prefix, decodes at and past a block's
    edge and of a first token, in one call over pages of 16 tokens (a key block spans four)."""
    lengths, new = [130, 150, 64, 65, 1], [130, 70, 1, 1, 1]
    cases = [sequence(L, H, KV, D, seed=3 * n, dtype=dtype) for n, L in enumerate(lengths)]
    q_parts = [q[L - t:] for (q, _), L, t in zip(cases, lengths, new)]
    out = paged_call(q_parts, [kv for _, kv in cases], 16, policy)
    ref = torch.cat([explicit(qp, *kv) for qp, (_, kv) in zip(q_parts, cases)])
    assert out.dtype == dtype and torch.allclose(out.double(), ref, atol=tol)


@pytest.mark.parametrize("packed", [False, True], ids=["batch", "packed"])
@pytest.mark.parametrize("policy", [ALIGNED, LOOP], ids=["kernel", "loop"])
def test_causal_attention_by_key_blocks_matches_float64(policy, packed):
    """The training forms: sequences of a batch (queries after a prefix too) and packed documents."""
    q, k, v = (randn(2, 100, h, 32, seed=s) for s, h in enumerate((4, 2, 2)))
    with numerics(policy):
        if packed:
            cu = torch.tensor([0, 30, 30, 95, 100], device=DEVICE)
            out = attention.causal_attention(q[:1], k[:1], v[:1], SCALE, cu_seqlens=cu, policy=policy)[0]
            ref = torch.cat([explicit(q[0, a:b], k[0, a:b], v[0, a:b]) for a, b in zip(cu.tolist(), cu[1:].tolist())])
        else:
            out = attention.causal_attention(q[:, 60:], k, v, SCALE, policy=policy)
            ref = torch.stack([explicit(q[b, 60:], k[b], v[b]) for b in range(2)])
    assert torch.allclose(out.double(), ref, atol=1e-5)


@pytest.mark.parametrize("H,KV", [(4, 2), (4, 1)], ids=["G2", "G4"])
@pytest.mark.parametrize("policy", [ALIGNED, LOOP], ids=["kernel", "loop"])
def test_a_querys_bits_do_not_depend_on_the_split_or_the_batch(policy, H, KV, row_by_row_dot):
    """A sequence of 150 tokens (three key blocks): its queries' bits from the training forward over it
    alone equal those from a training batch and packed documents with other sequences, a prefill chunk
    after a cached prefix beside another sequence's decode (pages of 16), single decode steps (pages of
    16 and of 128), and decodes batched with other sequences'."""
    L, D = 150, 32
    q, (k, v) = sequence(L, H, KV, D, seed=0)
    others = [sequence(n, H, KV, D, seed=10 + 3 * i) for i, n in enumerate((40, 200))]
    with numerics(policy):
        alone = attention.causal_attention(q[None], k[None], v[None], SCALE, policy=policy)[0]
        (q1, (k1, v1)), (q2, (k2, v2)) = others
        batch = attention.causal_attention(torch.stack([q2[:L], q]), torch.stack([k2[:L], k]), torch.stack([v2[:L], v]),
                                           SCALE, policy=policy)[1]
        cu = torch.tensor([0, 40, 40 + L, 40 + L + 7], device=DEVICE)
        packed = attention.causal_attention(*(torch.cat([a, b, c[:7]])[None] for a, b, c in
                                              ((q1, q, q2), (k1, k, k2), (v1, v, v2))),
                                            SCALE, cu_seqlens=cu, policy=policy)[0, 40:40 + L]
        chunk = paged_call([q[80:], q1[-1:]], [(k, v), (k1, v1)], 16, policy)[:70]
        decodes = {page: torch.cat([paged_call([q[t:t + 1]], [(k[:t + 1], v[:t + 1])], page, policy, seed=t)
                                    for t in (0, 63, 64, 100, 149)]) for page in (16, 128)}
        among = paged_call([q2[-1:], q[149:], q1[-1:]], [(k2, v2), (k, v), (k1, v1)], 16, policy)[1:2]
    assert torch.equal(batch, alone) and torch.equal(packed, alone)
    assert torch.equal(chunk, alone[80:])
    picked = alone[[0, 63, 64, 100, 149]]
    assert torch.equal(decodes[16], picked) and torch.equal(decodes[128], picked)
    assert torch.equal(among, alone[149:])


@pytest.mark.parametrize("policy", [ALIGNED, LOOP], ids=["kernel", "loop"])
def test_packed_documents_get_the_bits_of_each_document_alone(policy, row_by_row_dot):
    """Packed documents (one call, read in place) against each document's own call: lengths that fill
    whole key blocks, end inside one, are empty, or are one token."""
    lengths = [70, 0, 64, 1, 30]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE)
    T = sum(lengths)
    q, k, v = (randn(1, T, h, 16, seed=s) for s, h in enumerate((4, 2, 2)))
    with numerics(policy):
        packed = attention.causal_attention(q, k, v, 0.25, cu_seqlens=cu, policy=policy)
        alone = [attention.causal_attention(q[:, a:b], k[:, a:b], v[:, a:b], 0.25, policy=policy)
                 for a, b in zip(cu.tolist(), cu[1:].tolist())]
    assert torch.equal(packed, torch.cat(alone, dim=1))


def test_key_block_attention_rejects_bad_shapes():
    q, (k, v) = sequence(5, 4, 2, 16, seed=0)
    k_pages, v_pages, table = scattered_pages([(k, v)], 16)
    one = torch.tensor([5], device=DEVICE)
    offsets, start = torch.zeros(1, dtype=torch.long, device=DEVICE), torch.tensor([0, 5], device=DEVICE)
    with pytest.raises(ValueError, match="divide"):
        attention.attention_by_key_blocks(q[:, :3], k_pages, v_pages, table, offsets, one, start, SCALE, ALIGNED)
    with pytest.raises(ValueError, match="query_start"):
        attention.attention_by_key_blocks(q, k_pages, v_pages, table, offsets, one, start[:1], SCALE, ALIGNED)
    with pytest.raises(ValueError, match="power of two"):
        attention.attention_by_key_blocks(q[..., :12], k_pages[..., :12], v_pages[..., :12], table, offsets, one,
                                          start, SCALE, ALIGNED)


@pytest.mark.slow
def test_the_wrapped_attention_has_the_ordinary_gradient():
    """On CUDA `causal_attention` runs the kernel under an autograd Function whose backward is that of
    the fast path; its gradients against autograd through the PyTorch block loop in fp64."""
    q, k, v = (randn(2, 21, h, 16, seed=s).requires_grad_() for s, h in enumerate((4, 2, 2)))
    do = randn(2, 21, 4, 16, seed=3)
    for cu_seqlens in (None, torch.tensor([0, 9, 21], device=DEVICE)):
        B = 2 if cu_seqlens is None else 1
        out = attention._ByKeyBlocksFunction.apply(q[:B], k[:B], v[:B], 0.25, cu_seqlens, ALIGNED)
        with torch.no_grad():
            assert torch.equal(out, attention._causal_by_key_blocks(q[:B], k[:B], v[:B], 0.25, cu_seqlens, ALIGNED))
        grads = torch.autograd.grad((out * do[:B]).sum(), [q, k, v])
        ref = attention._causal_by_key_blocks(*(x[:B].double() for x in (q, k, v)), 0.25, cu_seqlens, ALIGNED)
        ref_grads = torch.autograd.grad((ref * do[:B].double()).sum(), [q, k, v])
        for a, b in zip(grads, ref_grads):
            assert torch.allclose(a, b.float(), atol=1e-5)


# -- the mode on the kernels -----------------------------------------------------------------------

@pytest.mark.slow
def test_the_mode_on_the_kernels(row_by_row_dot):
    """The tiny model under an invariant policy on the Triton backend (the kernels take CPU tensors
    through the interpreter): a sequence's logits alone equal its logits in a padded batch bit for bit,
    they agree with the fast path, and gradients flow through the aligned forward (RL trains on it)."""
    from infer_helpers import tiny_model

    model = tiny_model(num_hidden_layers=3, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=32, moe_intermediate_size=32,
                       moe_shared_expert_intermediate_size=32, num_experts=8).to(DEVICE)
    ids = torch.randint(1, 257, (2, 9), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    batch = model(ids, context=SequenceContext(policy=ALIGNED)).logits
    alone = model(ids[1:2, :5], context=SequenceContext(policy=ALIGNED)).logits
    assert torch.equal(alone[0], batch[1, :5])
    with torch.no_grad():
        fast = model(ids).logits
    assert ((batch - fast).norm() / fast.norm()).item() < 1e-5
    batch.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups,gated", [(1, False), (4, True)])
def test_rms_norm_rows_match_the_chain_and_a_row_alone(dtype, groups, gated):
    """The invariant RMSNorm kernel (a whole norm, or the Lightning output's gated group norm) against
    float64, its gradients against the chain's, and a token's bits alone = among other tokens."""
    from ringlinear.model.layers import rms_norm, rms_norm_chain

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 9, 256, generator=g) * 3).to(DEVICE, dtype).requires_grad_()
    weight = (1 + torch.randn(256, generator=g) * 0.1).to(DEVICE, dtype).requires_grad_()
    gate = torch.randn(2, 9, 256, generator=g).to(DEVICE, dtype).requires_grad_() if gated else None
    y = rms_norm(x, weight, 1e-6, groups, gate, policy=ALIGNED)
    exact = rms_norm_chain(*(t.detach().double() for t in (x, weight)), 1e-6, groups,
                           None if gate is None else gate.detach().double())
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.double(), exact, rtol=tol, atol=tol)
    alone = rms_norm(x[1, 4:5], weight, 1e-6, groups, None if gate is None else gate[1, 4:5], policy=ALIGNED)
    assert torch.equal(alone, y[1, 4:5])
    upstream = torch.randn(y.shape, generator=g).to(DEVICE, dtype)
    wanted = [t for t in (x, weight, gate) if t is not None]
    grads = torch.autograd.grad((y.float() * upstream.float()).sum(), wanted)
    chain = rms_norm_chain(x, weight, 1e-6, groups, gate)
    for a, b in zip(grads, torch.autograd.grad((chain.float() * upstream.float()).sum(), wanted)):
        torch.testing.assert_close(a, b)
