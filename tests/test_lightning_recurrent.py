"""The Triton recurrent Lightning kernel (batch-invariant mode): against the float64 reference, and
bit-identical whether a sequence runs alone, packed or batched with others, or as a prefill chunk
followed by decode steps against the state pool.

Without a GPU it runs in Triton's interpreter (conftest.py), a few ms per token and program: the
sequences are a dozen tokens long.
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from test_lightning_triton import DEVICE, SLOW, TOL, inputs, reference, rel, state  # noqa: E402

from ringlinear.ops import lightning_attn, lightning_decode  # noqa: E402
from ringlinear.ops.lightning import lightning_decode_reference  # noqa: E402
from ringlinear.ops.lightning.recurrent import lightning_decode_recurrent_triton  # noqa: E402
from ringlinear.ops.policy import KernelPolicy  # noqa: E402

H, D = 2, 64


ALIGNED = KernelPolicy("triton", invariant=True)  # the recurrent kernel, through the interpreter on a CPU


def attn(*args, **kwargs):
    return lightning_attn(*args, policy=ALIGNED, **kwargs)


def decode(*args):
    return lightning_decode(*args, policy=ALIGNED)


@pytest.mark.parametrize("dtype,offsets,with_state", [
    (torch.float32, None, True),
    (torch.bfloat16, None, False),
    (torch.float32, [0, 1, 1, 9, 14], True),  # a 1-token and an empty sequence keep their state
])
def test_forward_matches_float64(dtype, offsets, with_state):
    B, T = (2, 9) if offsets is None else (1, offsets[-1])
    N = B if offsets is None else len(offsets) - 1
    q, k, v, g = inputs(B, T, H, D, dtype)
    h0 = state(N, H, D) if with_state else None
    cu = None if offsets is None else torch.tensor(offsets, device=DEVICE, dtype=torch.int32)
    o, ht = attn(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    ro, rh = reference(q, k, v, g, h0, offsets)
    assert o.dtype == dtype and ht.dtype == torch.float32 and ht.shape == (N, H, D, D)
    assert rel(o, ro) < TOL[dtype] and rel(ht, rh) < 1e-5
    if offsets is not None:
        assert torch.equal(ht[1], h0[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_matches_float64_and_updates_only_its_slots(dtype):
    gen = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(3, 3, H, D, generator=gen).to(DEVICE, dtype).unbind(1)  # strided views
    g = inputs(1, 1, H, D, dtype)[3]
    pool = state(5, H, D)
    slots = torch.tensor([4, 0, 2], device=DEVICE)
    ref_pool = pool.double()
    ref_o = lightning_decode_reference(q.double(), k.double(), v.double(), g, ref_pool, slots)
    o = decode(q, k, v, g, pool, slots)
    assert o.dtype == dtype and rel(o, ref_o) < TOL[dtype] and rel(pool, ref_pool) < 1e-6
    assert torch.equal(pool[[1, 3]].double(), ref_pool[[1, 3]])
    with pytest.raises(ValueError, match="fp32 state pool"):
        lightning_decode_recurrent_triton(q, k, v, g, pool.double(), slots)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.slow
def test_a_sequence_gets_the_same_bits_however_it_is_run(dtype):
    L, P = 12, 5  # the sequence, and its prefill chunk before decode steps
    q, k, v, g = inputs(1, L, H, D, dtype)
    others = inputs(1, L + 3, H, D, dtype, seed=1)[:3]  # tokens of the sequences run alongside

    alone_o, alone_s = attn(q, k, v, g, output_final_state=True)
    runs = {}

    # the engine: a prefill chunk packed after another sequence's chunk, from states at pool slots,
    # then one decode call per token alongside another sequence
    pool = state(4, H, D)
    pool[2] = 0  # the sequence's slot starts from zero, like a new request's
    slots = torch.tensor([0, 2], device=DEVICE)
    cu = torch.tensor([0, 3, 3 + P], device=DEVICE)
    packed = [torch.cat([y[:, :3], x[:, :P]], 1) for y, x in zip(others, (q, k, v))]
    o, final = attn(*packed, g, initial_state=pool[slots], output_final_state=True, cu_seqlens=cu)
    pool[slots] = final
    outputs = [o[:, 3:]]
    decode_slots = torch.tensor([2, 1], device=DEVICE)
    for t in range(P, L):
        step = [torch.stack([x[0, t], y[0, t]]) for x, y in zip((q, k, v), others)]
        outputs.append(decode(*step, g, pool, decode_slots)[None, :1])
    runs["prefill + decode"] = torch.cat(outputs, 1), pool[2]

    # packed between two other sequences
    cu = torch.tensor([0, 4, 4 + L, 4 + L + 7], device=DEVICE, dtype=torch.int32)
    packed = [torch.cat([y[:, :4], x, y[:, 4:11]], 1) for y, x in zip(others, (q, k, v))]
    o, final = attn(*packed, g, output_final_state=True, cu_seqlens=cu)
    runs["packed"] = o[:, 4:4 + L], final[1]

    # row 1 of a [B, T] batch: as long as the other row, then right-padded (the state then differs)
    for T in (L, L + 3):
        batch = [torch.cat([y[:, :T], F.pad(x, (0, 0, 0, 0, 0, T - L))]) for y, x in zip(others, (q, k, v))]
        o, final = attn(*batch, g, output_final_state=True)
        runs[f"[2, {T}]"] = o[1:, :L], final[1] if T == L else None

    for name, (o, s) in runs.items():
        assert torch.equal(o, alone_o), name
        assert s is None or torch.equal(s, alone_s[0]), name


@pytest.mark.parametrize("offsets,with_state", [(None, True), SLOW([0, 1, 1, 10, 16], False)])
def test_gradients_match_float64_autograd(offsets, with_state):
    B, T = (2, 9) if offsets is None else (1, offsets[-1])
    N = B if offsets is None else len(offsets) - 1
    q, k, v, g = inputs(B, T, H, D, torch.float32, requires_grad=True)
    h0 = state(N, H, D, requires_grad=True) if with_state else None
    cu = None if offsets is None else torch.tensor(offsets, device=DEVICE)
    o, ht = attn(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    gen = torch.Generator().manual_seed(2)
    do, dht = (torch.randn(x.shape, generator=gen).to(DEVICE) for x in (o, ht))
    leaves = [q, k, v] + ([h0] if with_state else [])
    grads = torch.autograd.grad((o * do).sum() + (ht * dht).sum(), leaves)  # outside the mode, as in training
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    ro, rh = reference(*ref_leaves[:3], g, ref_leaves[3] if with_state else None, offsets)
    ref_grads = torch.autograd.grad((ro * do.double()).sum() + (rh * dht.double()).sum(), ref_leaves)
    for name, a, b in zip("q k v h0".split(), grads, ref_grads):
        assert rel(a, b) < 1e-4, name
