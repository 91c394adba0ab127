"""The three reference forms of Lightning attention against an independent float64 loop."""

import pytest
import torch

from ringlinear.ops import lightning_attn, lightning_decode
from ringlinear.ops.lightning import (lightning_attn_chunked, lightning_attn_quadratic,
                                      lightning_attn_recurrent)


def direct_sum(q, k, v, log_decay, scale, initial_state):
    """o_t = scale q_t (λ^(t+1) S0 + Σ_{s≤t} λ^(t-s) k_sᵀ v_s), written as plain loops in float64."""
    B, T, H, D = q.shape
    o = torch.zeros(B, T, H, D, dtype=torch.float64)
    final = torch.zeros(B, H, D, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            lam = torch.exp(log_decay[h].double())
            for t in range(T):
                S = lam ** (t + 1) * initial_state[b, h]
                for s in range(t + 1):
                    S = S + lam ** (t - s) * torch.outer(k[b, s, h], v[b, s, h])
                o[b, t, h] = scale * q[b, t, h] @ S
            final[b, h] = lam ** T * initial_state[b, h] + sum(
                (lam ** (T - 1 - s) * torch.outer(k[b, s, h], v[b, s, h]) for s in range(T)),
                torch.zeros(D, D, dtype=torch.float64))
    return o, final


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def random_inputs(B, T, H, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=g, dtype=dtype) for _ in range(3))
    state = torch.randn(B, H, D, D, generator=g, dtype=torch.float64)
    return q, k, v, state


FORMS = [lightning_attn_quadratic, lightning_attn_recurrent,
         lambda *a, **kw: lightning_attn_chunked(*a, chunk_size=4, **kw)]


@pytest.mark.parametrize("form", FORMS, ids=["quadratic", "recurrent", "chunked"])
@pytest.mark.parametrize("T", [1, 7, 13])
def test_forms_match_the_direct_sum(form, T):
    q, k, v, state = random_inputs(2, T, 3, 4)
    log_decay = torch.tensor([-0.69, -0.1, -0.001], dtype=torch.float64)  # λ ≈ 0.5 ... ≈ 1
    o, final = form(q, k, v, log_decay, scale=0.3, initial_state=state)
    o_ref, final_ref = direct_sum(q, k, v, log_decay, 0.3, state)
    assert rel(o, o_ref) < 1e-12 and rel(final, final_ref) < 1e-12


def test_forms_agree_on_long_sequences_with_strong_decay():
    """λ ≈ 0.5 over 1000 tokens: λ^T underflows to 0 without overflow or NaN in any form."""
    q, k, v, state = random_inputs(1, 1000, 2, 8)
    log_decay = torch.tensor([-0.6931, -0.01], dtype=torch.float64)
    results = [form(q, k, v, log_decay, initial_state=state) for form in
               (lightning_attn_quadratic, lightning_attn_recurrent, lightning_attn_chunked)]
    for o, final in results:
        assert torch.isfinite(o).all() and torch.isfinite(final).all()
    for o, final in results[1:]:
        assert rel(o, results[0][0]) < 1e-10 and rel(final, results[0][1]) < 1e-10


def test_chunks_compose_through_the_state():
    """Running a sequence in two calls, the second from the first's final state, equals one call."""
    q, k, v, _ = random_inputs(2, 50, 2, 8)
    log_decay = torch.tensor([-0.3, -0.02], dtype=torch.float64)
    o, final = lightning_attn(q, k, v, log_decay, output_final_state=True)
    o1, s1 = lightning_attn(q[:, :21], k[:, :21], v[:, :21], log_decay, output_final_state=True)
    o2, s2 = lightning_attn(q[:, 21:], k[:, 21:], v[:, 21:], log_decay, initial_state=s1,
                            output_final_state=True)
    assert rel(torch.cat([o1, o2], 1), o) < 1e-12 and rel(s2, final) < 1e-12


def test_packed_sequences_are_independent():
    q, k, v, state = random_inputs(1, 30, 2, 4)
    log_decay = torch.tensor([-0.5, -0.05], dtype=torch.float64)
    cu = torch.tensor([0, 1, 12, 12, 30])  # a 1-token and an empty sequence
    init = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    o, final = lightning_attn(q, k, v, log_decay, initial_state=init, output_final_state=True, cu_seqlens=cu)
    for n, (a, b) in enumerate(zip(cu.tolist(), cu[1:].tolist())):
        o_n, f_n = lightning_attn_recurrent(q[:, a:b], k[:, a:b], v[:, a:b], log_decay,
                                            initial_state=init[n:n + 1])
        assert rel(final[n:n + 1], f_n) < 1e-12
        if b > a:
            assert rel(o[:, a:b], o_n) < 1e-12


def test_gradients_flow_to_inputs_and_state():
    q, k, v, state = random_inputs(1, 9, 2, 4)
    tensors = [x.clone().requires_grad_() for x in (q, k, v, state)]
    log_decay = torch.tensor([-0.4, -0.04], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda q, k, v, s: lightning_attn(q, k, v, log_decay, initial_state=s, output_final_state=True),
        tensors)


def test_decode_updates_only_its_slots():
    q, k, v, _ = random_inputs(3, 1, 2, 4)
    log_decay = torch.tensor([-0.7, -0.01], dtype=torch.float64)
    pool = torch.randn(6, 2, 4, 4, dtype=torch.float64)
    before = pool.clone()
    slots = torch.tensor([4, 0, 2])
    o = lightning_decode(q[:, 0], k[:, 0], v[:, 0], log_decay, pool, slots)
    o_ref, s_ref = direct_sum(q, k, v, log_decay, 4 ** -0.5, before[slots])
    assert rel(o, o_ref[:, 0]) < 1e-12 and rel(pool[slots], s_ref) < 1e-12
    assert torch.equal(pool[[1, 3, 5]], before[[1, 3, 5]])


def test_low_precision_inputs_keep_an_fp32_state():
    q, k, v, _ = random_inputs(1, 20, 2, 8, dtype=torch.bfloat16)
    log_decay = torch.tensor([-0.2, -0.02])
    o, final = lightning_attn(q, k, v, log_decay, output_final_state=True)
    o_ref, final_ref = lightning_attn_recurrent(q.double(), k.double(), v.double(), log_decay.double())
    assert o.dtype == torch.bfloat16 and final.dtype == torch.float32
    assert rel(o, o_ref) < 1e-2 and rel(final, final_ref) < 1e-5


@pytest.mark.parametrize("change, message", [
    (dict(k=torch.zeros(1, 5, 2, 3)), "same shape"),
    (dict(log_decay=torch.tensor([-0.1, 0.0])), "negative"),
    (dict(log_decay=torch.tensor([-0.1])), r"shape \[H\]"),
    (dict(initial_state=torch.zeros(1, 2, 4, 3)), "initial_state"),
    (dict(cu_seqlens=torch.tensor([0, 3, 2, 5])), "non-decreasing"),
    (dict(cu_seqlens=torch.tensor([0, 3, 4])), "end at T=5"),
    (dict(cu_seqlens=torch.tensor([1, 3, 5])), "start at 0"),
])
def test_bad_inputs_raise(change, message):
    args = dict(q=torch.randn(1, 5, 2, 4), k=torch.randn(1, 5, 2, 4), v=torch.randn(1, 5, 2, 4),
                log_decay=torch.tensor([-0.1, -0.2]))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        lightning_attn(**args)


def test_bad_decode_inputs_raise():
    q = torch.randn(2, 2, 4)
    decay = torch.tensor([-0.1, -0.2])
    with pytest.raises(ValueError, match="state must be a pool"):
        lightning_decode(q, q, q, decay, torch.zeros(4, 2, 4, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="float32"):
        lightning_decode(q, q, q, decay, torch.zeros(4, 2, 4, 4, dtype=torch.bfloat16), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="slots"):
        lightning_decode(q, q, q, decay, torch.zeros(4, 2, 4, 4), torch.tensor([0]))
