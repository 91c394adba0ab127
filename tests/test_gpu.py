"""The model on CUDA with the Triton kernels, against itself on the PyTorch reference path.
Skipped without a GPU; run on one with `python -m pytest -q tests/test_gpu.py`."""

import pytest
import torch

from ringlinear import HybridCache, RingLinearConfig, RingLinearForCausalLM, SequenceContext
from ringlinear.ops.attention import causal_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def model(dtype, **overrides):
    """Dense MLPs only: a routing choice flipped by one rounding would swamp the attention-kernel
    differences these tests look for."""
    torch.manual_seed(0)
    config = RingLinearConfig.preset("tiny", head_dim=128, num_attention_heads=4, hidden_size=512,
                                     first_k_dense_replace=6, **overrides)
    return RingLinearForCausalLM(config).to("cuda", dtype)


def test_varlen_flash_attention_matches_the_masked_reference():
    cu = torch.tensor([0, 100, 101, 357, 512], device="cuda")
    q = torch.randn(1, 512, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 512, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 512, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    o = causal_attention(q, k, v, 128**-0.5, cu_seqlens=cu)
    ref_inputs = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = causal_attention(*ref_inputs, 128**-0.5, cu_seqlens=cu)
    assert rel(o, ref) < 1e-2
    grad = torch.randn_like(ref)
    o.backward(grad.bfloat16())
    ref.backward(grad)
    for x, r in zip((q, k, v), ref_inputs):
        assert rel(x.grad, r.grad) < 2e-2


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-3), (torch.bfloat16, 2e-2)])
def test_prefill_then_decode_equals_the_full_forward(dtype, tol):
    m = model(dtype).eval()
    ids = torch.randint(0, m.config.vocab_size, (4, 300), device="cuda")
    with torch.no_grad():
        full = m(ids).logits
        cache = HybridCache(m.config, 4, 320, device="cuda", dtype=dtype)
        pieces = [m(ids[:, :257], context=cache).logits]
        pieces += [m(ids[:, t:t + 1], context=cache).logits for t in range(257, 300)]
    assert rel(torch.cat(pieces, 1), full) <= tol


def test_training_step_with_triton_matches_the_reference_path():
    m = model(torch.bfloat16).train()
    ids = torch.randint(0, m.config.vocab_size, (1, 1000), device="cuda")
    cu = torch.tensor([0, 1, 300, 300, 777, 1000], device="cuda")
    results = []
    for backend in ("triton", "torch"):
        m.zero_grad()
        out = m(ids, labels=ids, context=SequenceContext(cu, backend=backend))
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (loss_t, grads_t), (loss_r, grads_r) = results
    assert abs(loss_t.item() - loss_r.item()) < 1e-2
    for name, g in grads_r.items():
        assert rel(grads_t[name], g) < 5e-2, name


def test_packed_documents_equal_separate_runs():
    m = model(torch.bfloat16).eval()
    lengths = [130, 1, 64, 400]
    docs = [torch.randint(0, m.config.vocab_size, (1, n), device="cuda") for n in lengths]
    cu = torch.tensor([0, 130, 131, 195, 595], device="cuda")
    with torch.no_grad():
        packed = m(torch.cat(docs, 1), cu_seqlens=cu).logits
        alone = torch.cat([m(d).logits for d in docs], 1)
    assert rel(packed, alone) < 2e-2
