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
from ringlinear.ops.batch_invariant import KEY_BLOCK, numerics  # noqa: E402
from ringlinear.ops.invariant_kernels import (invariant_grouped_mm, invariant_linear, key_block_attention,  # noqa: E402
                                              row_sum, softmax)
from ringlinear.ops.policy import KernelPolicy  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
ALIGNED = KernelPolicy("triton", invariant=True)  # the invariant kernels, through the interpreter on a CPU


@pytest.fixture
def row_by_row_dot(monkeypatch):
    """The interpreter's `tl.dot` is numpy's matmul, whose BLAS rounds a row differently by its place
    in the tile; an MMA on the GPU computes each element alike wherever its row sits. A product one row
    at a time models that, so that the bit-identity checks test the kernels' logic."""
    if not INTERPRET:
        return
    import numpy as np
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    create_dot = InterpreterBuilder.create_dot

    def by_rows(self, a, b, d, input_precision, max_num_imprecise_acc):
        rows = [create_dot(self, TensorHandle(a.data[i:i + 1], a.dtype), b, TensorHandle(d.data[i:i + 1], d.dtype),
                           input_precision, max_num_imprecise_acc) for i in range(a.data.shape[0])]
        return TensorHandle(np.concatenate([r.data for r in rows]), rows[0].dtype)

    monkeypatch.setattr(InterpreterBuilder, "create_dot", by_rows)


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


@pytest.mark.parametrize("kernel", ["kernel_and_loop", "grouped_mm"])
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

@pytest.mark.parametrize("columns", [7, 1500])  # one partial block; a loop of two
def test_row_sums_and_softmax_match_torch_and_a_row_alone(columns):
    x = randn(2, 3, columns) * 3
    for ours, ref in ((row_sum(x), x.sum(-1)), (row_sum(x, mean=True), x.mean(-1)),
                      (softmax(x), x.softmax(-1)), (softmax(x, log=True), x.log_softmax(-1))):
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

def paged(T=6, H=4, KV=2, D=32, dtype=torch.float32):
    """Queries of three sequences at various positions, their key blocks scattered over a pool."""
    KB = KEY_BLOCK
    q = randn(T, H, D, dtype=dtype)
    k_blocks, v_blocks = randn(9, KB, KV, D, seed=1, dtype=dtype), randn(9, KB, KV, D, seed=2, dtype=dtype)
    tables = torch.tensor([[4, 0, 7], [1, 8, 2], [3, 5, 6]], device=DEVICE)
    seq = torch.tensor([0, 1, 0, 2, 1, 2][:T], device=DEVICE)
    positions = torch.tensor([0, 47, 20, 15, 16, 33][:T], device=DEVICE)
    return q, k_blocks, v_blocks, tables[seq], positions


@pytest.mark.parametrize("H,KV,dtype,tol", [(4, 2, torch.float32, 1e-5), (6, 2, torch.float32, 1e-5),
                                            (4, 4, torch.bfloat16, 1e-2)])
def test_key_block_attention_matches_the_reference(H, KV, dtype, tol):
    q, k_blocks, v_blocks, table, positions = paged(H=H, KV=KV, dtype=dtype)
    out = key_block_attention(q, k_blocks, v_blocks, table, positions, 0.2)
    ref = attention.attention_by_key_blocks(q.float(), k_blocks.float(), v_blocks.float(), table, positions, 0.2,
                                            KernelPolicy("torch", invariant=True))
    assert out.dtype == dtype and torch.allclose(out.float(), ref, atol=tol)


def test_key_block_attention_query_alone_equals_it_among_others():
    q, k_blocks, v_blocks, table, positions = paged()
    together = key_block_attention(q, k_blocks, v_blocks, table, positions, 0.2)
    for t in range(q.shape[0]):
        # alone, with a table cut to its own blocks and the keys past it overwritten
        KB = KEY_BLOCK
        own = table[t:t + 1, :int(positions[t]) // KB + 1]
        k_other = k_blocks.clone()
        k_other[own[0, -1], int(positions[t]) % KB + 1:] = float("nan")
        alone = key_block_attention(q[t:t + 1], k_other, v_blocks, own, positions[t:t + 1], 0.2)
        assert torch.equal(alone[0], together[t])


@pytest.mark.parametrize("policy", [ALIGNED, KernelPolicy("torch", invariant=True)], ids=["kernel", "loop"])
def test_packed_documents_get_the_bits_of_each_document_alone(policy):
    """Packed documents (one call, blocks laid out on the device) against each document's own call:
    lengths that fill whole key blocks, end inside one, are empty, or are one token."""
    lengths = [17, 0, 16, 1, 30]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE)
    T = sum(lengths)
    q, k, v = (randn(1, T, h, 16, seed=s) for s, h in enumerate((4, 2, 2)))
    with numerics(policy):
        packed = attention.causal_attention(q, k, v, 0.25, cu_seqlens=cu, policy=policy)
        alone = [attention.causal_attention(q[:, a:b], k[:, a:b], v[:, a:b], 0.25, policy=policy)
                 for a, b in zip(cu.tolist(), cu[1:].tolist())]
    assert torch.equal(packed, torch.cat(alone, dim=1))


def test_key_block_attention_rejects_bad_shapes():
    q, k_blocks, v_blocks, table, positions = paged()
    with pytest.raises(ValueError, match="divide"):
        key_block_attention(q[:, :3], k_blocks, v_blocks, table, positions, 0.2)
    with pytest.raises(ValueError, match="positions"):
        key_block_attention(q, k_blocks, v_blocks, table, positions[:2], 0.2)


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
