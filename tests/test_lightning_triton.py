"""The Triton Lightning-attention kernels against the float64 references.

Without a GPU the kernels run in Triton's interpreter (set up in conftest.py). Shapes are small:
the interpreter is slow.
"""

import pytest
import torch
from conftest import INTERPRET

triton = pytest.importorskip("triton")

from ringlinear.ops import lightning_attn, lightning_decode  # noqa: E402
from ringlinear.ops.lightning import lightning_attn_quadratic, lightning_decode_reference  # noqa: E402
from ringlinear.ops.lightning.chunk import lightning_attn_triton  # noqa: E402
from ringlinear.ops.lightning.decode import lightning_decode_triton  # noqa: E402
from ringlinear.ops.policy import KernelPolicy  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
TRITON = KernelPolicy("triton")  # the kernels, through the interpreter on a CPU


def SLOW(*values):
    """A parameter set of the full suite only (`-m "not slow"` leaves it out)."""
    return pytest.param(*values, marks=pytest.mark.slow)
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 5e-3}


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def inputs(B, T, H, D, dtype, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=gen).to(DEVICE, dtype).requires_grad_(requires_grad)
               for _ in range(3))
    # strong (λ = 0.5) and weak (λ ≈ 0.996) decay
    log_decay = -torch.tensor([0.6931, 2.0**-8] * (H // 2), device=DEVICE)
    return q, k, v, log_decay


def state(N, H, D, seed=1, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, H, D, D, generator=gen).to(DEVICE).requires_grad_(requires_grad)


def reference(q, k, v, log_decay, h0, offsets):
    """float64 reference, per packed sequence when `offsets` is given."""
    q, k, v = (x.double() for x in (q, k, v))
    h0 = None if h0 is None else h0.double()
    if offsets is None:
        return lightning_attn_quadratic(q, k, v, log_decay.double(), None, h0)
    outs, finals = [], []
    for n, (a, b) in enumerate(zip(offsets, offsets[1:])):
        o, f = lightning_attn_quadratic(q[:, a:b], k[:, a:b], v[:, a:b], log_decay.double(), None,
                                        None if h0 is None else h0[n:n + 1])
        outs.append(o)
        finals.append(f)
    return torch.cat(outs, 1), torch.cat(finals)


@pytest.mark.parametrize("T,D,dtype,seg_len", [
    (37, 64, torch.float32, None),      # T < chunk
    (131, 64, torch.float32, None),     # odd T, 3 chunks
    SLOW(200, 64, torch.float32, 64),   # 4 segments of one chunk
    SLOW(131, 128, torch.float32, 128),
    SLOW(70, 256, torch.float32, None),
    SLOW(131, 64, torch.float16, 64),
    (131, 128, torch.bfloat16, None),
])
def test_forward_matches_float64(T, D, dtype, seg_len):
    B, H = 2, 2
    q, k, v, g = inputs(B, T, H, D, dtype)
    h0 = state(B, H, D)
    o, ht = lightning_attn_triton(q, k, v, g, None, h0, True, None, None, seg_len=seg_len)
    ro, rh = reference(q, k, v, g, h0, None)
    assert o.dtype == dtype and ht.dtype == torch.float32 and ht.shape == (B, H, D, D)
    assert rel(o, ro) < TOL[dtype]
    assert rel(ht, rh) < TOL[dtype]


@pytest.mark.slow
def test_long_strong_decay_stays_finite():
    # λ = 0.5 over 1,000 tokens in 8 segments: the decay of the first token underflows to 0, never inf
    q, k, v, g = inputs(1, 1000, 2, 64, torch.float32)
    h0 = state(1, 2, 64)
    o, ht = lightning_attn_triton(q, k, v, g, None, h0, True, None, None, seg_len=128)
    ro, rh = reference(q, k, v, g, h0, None)
    assert rel(o, ro) < 1e-4 and rel(ht, rh) < 1e-4


@pytest.mark.parametrize("seg_len,max_seqlen", [
    (None, None),  # planned for T, the bound
    (64, 130),     # the true longest: 3 segments of 64 for it
    (64, 100),     # low: 2 segments, the second runs to the end
    (None, 100),   # low: 1 segment of 128 for a sequence of 130
])
def test_varlen_with_short_and_empty_sequences(seg_len, max_seqlen):
    H, D = 2, 64
    offsets = [0, 1, 1, 70, 200, 200]  # a 1-token, an empty, two long, an empty tail sequence
    q, k, v, g = inputs(1, offsets[-1], H, D, torch.float32)
    h0 = state(len(offsets) - 1, H, D)
    cu = torch.tensor(offsets, device=DEVICE, dtype=torch.int32)
    o, ht = lightning_attn_triton(q, k, v, g, None, h0, True, cu, max_seqlen, seg_len=seg_len)
    ro, rh = reference(q, k, v, g, h0, offsets)
    assert rel(o, ro) < 1e-4 and rel(ht, rh) < 1e-4
    assert torch.equal(ht[1], h0[1]) and torch.equal(ht[4], h0[4])  # empty: the state passes through


@pytest.mark.parametrize("T,dtype,offsets,with_state", [
    SLOW(131, torch.float32, None, True),
    (45, torch.float32, None, False),
    SLOW(200, torch.float32, [0, 1, 1, 150, 200], True),
    SLOW(131, torch.bfloat16, None, True),
])
def test_gradients_match_float64_autograd(T, dtype, offsets, with_state):
    H, D = 2, 64
    B = 2 if offsets is None else 1
    N = B if offsets is None else len(offsets) - 1
    q, k, v, g = inputs(B, T, H, D, dtype, requires_grad=True)
    h0 = state(N, H, D, requires_grad=True) if with_state else None
    cu = None if offsets is None else torch.tensor(offsets, device=DEVICE)
    o, ht = lightning_attn(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                           policy=TRITON)
    gen = torch.Generator().manual_seed(2)
    do, dht = (torch.randn(x.shape, generator=gen).to(DEVICE, x.dtype) for x in (o, ht))
    leaves = [q, k, v] + ([h0] if with_state else [])
    grads = torch.autograd.grad((o * do).sum() + (ht * dht).sum(), leaves)
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    ro, rh = reference(*ref_leaves[:3], g, ref_leaves[3] if with_state else None, offsets)
    ref_grads = torch.autograd.grad((ro * do.double()).sum() + (rh * dht.double()).sum(), ref_leaves)
    for name, a, b in zip("q k v h0".split(), grads, ref_grads):
        assert a.dtype == (dtype if name != "h0" else torch.float32)
        assert rel(a, b) < TOL[dtype], name


@pytest.mark.slow
def test_backward_over_segments_without_final_state():
    # the backward splits the sequence itself (no dht): force it with a long T on few heads
    q, k, v, g = inputs(1, 1100, 2, 64, torch.float32, requires_grad=True)
    o, _ = lightning_attn(q, k, v, g, policy=TRITON)
    do = torch.randn_like(o)
    grads = torch.autograd.grad((o * do).sum(), [q, k, v])
    ref_leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ro, _ = reference(*ref_leaves, g, None, None)
    ref_grads = torch.autograd.grad((ro * do.double()).sum(), ref_leaves)
    for a, b in zip(grads, ref_grads):
        assert rel(a, b) < 1e-4


@pytest.mark.parametrize("D,dtype", [(64, torch.float32), SLOW(128, torch.float16), SLOW(128, torch.bfloat16)])
def test_decode_updates_only_its_slots(D, dtype):
    N, H, pool = 3, 2, 6
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(N, 3, H, D, generator=gen).to(DEVICE, dtype)
    q, k, v = qkv.unbind(1)  # strided views, as out of a fused projection
    g = -torch.tensor([0.6931, 2.0**-8], device=DEVICE)
    s = torch.randn(pool, H, D, D, generator=gen).to(DEVICE)
    slots = torch.tensor([4, 0, 2], device=DEVICE)
    ref_state = s.double()
    ref_o = lightning_decode_reference(q.double(), k.double(), v.double(), g, ref_state, slots)
    o = lightning_decode(q, k, v, g, s, slots, policy=TRITON)
    assert o.dtype == dtype and o.shape == (N, H, D)
    assert rel(o, ref_o) < TOL[dtype]
    assert rel(s, ref_state) < 1e-6
    untouched = torch.tensor([1, 3, 5], device=DEVICE)
    assert torch.equal(s[untouched].double(), ref_state[untouched])


def test_decode_small_blocks_into_given_output():
    gen = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(3, 2, 2, 128, generator=gen).to(DEVICE).unbind(0)
    g = -torch.tensor([0.6931, 0.01], device=DEVICE)
    s = state(2, 2, 128)
    slots = torch.tensor([1, 0], device=DEVICE)
    ref_state = s.double()
    ref_o = lightning_decode_reference(q.double(), k.double(), v.double(), g, ref_state, slots)
    out = torch.full_like(q, float("nan"))
    o = lightning_decode_triton(q, k, v, g, s, slots, out=out, block_v=8)
    assert o is out and rel(o, ref_o) < 1e-5 and rel(s, ref_state) < 1e-6


def test_bad_inputs_raise_value_error():
    q, k, v, g = inputs(1, 8, 2, 64, torch.float32)
    with pytest.raises(ValueError, match="head dims"):
        lightning_attn_triton(q[..., :32], k[..., :32], v[..., :32], g, None, None, False, None, None)
    with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
        lightning_attn_triton(q.double(), k.double(), v.double(), g, None, None, False, None, None)
    with pytest.raises(ValueError, match="same shape"):
        lightning_attn(q, k[:, :4], v, g, policy=TRITON)
    with pytest.raises(ValueError, match="negative"):
        lightning_attn(q, k, v, -g, policy=TRITON)
    checked = g.clone()
    lightning_attn(q, k, v, checked, policy=TRITON)
    checked.neg_()  # the sign check is cached per tensor, but not across an in-place change
    with pytest.raises(ValueError, match="negative"):
        lightning_attn(q, k, v, checked, policy=TRITON)
    with pytest.raises(ValueError, match="initial_state"):
        lightning_attn(q, k, v, g, initial_state=state(2, 2, 64), policy=TRITON)
    for bad in ([0, 5, 3, 8], [0, 4, 7]):
        with pytest.raises(ValueError, match="cu_seqlens"):
            lightning_attn(q, k, v, g, cu_seqlens=torch.tensor(bad, device=DEVICE), policy=TRITON)
    cu = torch.tensor([0, 3, 8], device=DEVICE)
    with pytest.raises(ValueError, match="max_seqlen"):
        lightning_attn(q, k, v, g, cu_seqlens=cu, max_seqlen=9, policy=TRITON)
    with pytest.raises(ValueError, match="max_seqlen"):
        lightning_attn(q, k, v, g, max_seqlen=8, policy=TRITON)
    with pytest.raises(ValueError, match="seg_len"):
        lightning_attn_triton(q, k, v, g, None, None, False, None, None, seg_len=100)
    strided = torch.randn(1, 64, 2, device=DEVICE).transpose(1, 2)  # [1, H, D] with D not unit-stride
    with pytest.raises(ValueError, match="contiguous"):
        lightning_decode_triton(strided, k[:, 0], v[:, 0], g, state(1, 2, 64), torch.tensor([0], device=DEVICE))
