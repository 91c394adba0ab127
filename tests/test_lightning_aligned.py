"""The chunk-aligned Lightning form (batch-invariant mode), its Triton kernel (through the interpreter on
a CPU) and its PyTorch reference: against the float64 quadratic form, and bit-identical however a
sequence is split into calls (whole, packed with other documents, a [B, T] row, prefill chunks of odd
sizes starting mid-chunk, one-token decode steps, chunk-completing steps, verify chains).
"""

import pytest
import torch

from ringlinear.ops import lightning_attn
from ringlinear.ops.lightning import CHUNK, lightning_aligned, lightning_attn_quadratic, lightning_decode
from ringlinear.ops.policy import KernelPolicy, triton_installed

from test_lightning_triton import DEVICE, TOL, inputs, reference, rel, state  # noqa: E402  (isort: tests dir)

H, D = 2, 64
STATE_TOL = {torch.float32: 1e-5, torch.bfloat16: TOL[torch.bfloat16]}  # 16-bit products, as chunk.py's
POLICIES = [pytest.param(KernelPolicy("torch", invariant=True), id="torch"),
            pytest.param(KernelPolicy("triton", invariant=True), id="triton",
                         marks=pytest.mark.skipif(not triton_installed(), reason="no Triton"))]


def pools(num_slots: int, dtype: torch.dtype, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A state pool and its partial chunks, random (rows a call must not read hold noise)."""
    gen = torch.Generator().manual_seed(seed)
    chunk_k, chunk_v = (torch.randn(num_slots, CHUNK, H, D, generator=gen).to(DEVICE, dtype) for _ in range(2))
    return state(num_slots, H, D, seed=seed), chunk_k, chunk_v


def ints(*values: int) -> torch.Tensor:
    return torch.tensor(values, device=DEVICE)


def packed_rows(T: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q, k, v [T, H, D] (tokens of one call, packed) and the decays."""
    q, k, v, g = inputs(1, T, H, D, dtype, seed)
    return q[0], k[0], v[0], g


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("dtype,offsets", [
    (torch.float32, None),
    (torch.bfloat16, None),
    (torch.float32, [0, 1, 1, 70, 200]),  # a 1-token and an empty sequence keep their state
])
def test_whole_sequences_match_float64(policy, dtype, offsets):
    B, T = (2, 140) if offsets is None else (1, offsets[-1])
    N = B if offsets is None else len(offsets) - 1
    q, k, v, g = inputs(B, T, H, D, dtype)
    h0 = state(N, H, D)
    cu = None if offsets is None else torch.tensor(offsets, device=DEVICE, dtype=torch.int32)
    o, ht = lightning_attn(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu, policy=policy)
    ro, rh = reference(q, k, v, g, h0, offsets)
    assert o.dtype == dtype and ht.dtype == torch.float32 and ht.shape == (N, H, D, D)
    assert rel(o, ro) < TOL[dtype] and rel(ht, rh) < STATE_TOL[dtype]
    if offsets is not None:
        assert torch.equal(ht[1], h0[1])


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_continuing_from_a_partial_chunk_matches_float64(policy, dtype):
    """Three sequences continue from the state at their chunk's start and its rows so far: 5 tokens
    inside a chunk, 80 from offset 40 (completing it, then 56 rows of the next), 1 from offset 63
    (completing it). The pools end with the state at the last chunk's start and its rows."""
    positions, lengths = ints(64 + 10, 40, 128 + 63), ints(5, 80, 1)
    q, k, v, g = packed_rows(86, dtype)
    state_pool, chunk_k, chunk_v = pools(5, dtype)
    slots, starts = ints(3, 0, 4), ints(0, 5, 85)
    before = [x.clone() for x in (state_pool, chunk_k, chunk_v)]
    o = lightning_aligned(q, k, v, g, state_pool, chunk_k, chunk_v, slots, positions, starts, lengths, policy=policy)
    for n in range(3):
        slot, offset, start, length = (int(x[n]) for x in (slots, positions % CHUNK, starts, lengths))
        rows = [torch.cat([x[slot, :offset], y[start:start + length]])[None] for x, y in
                zip(before[1:], (k, v))]
        # the float64 reference runs the buffered rows again (their outputs are not compared)
        q_rows = torch.cat([torch.zeros_like(rows[0][0, :offset]), q[start:start + length]])[None]
        ro, _ = lightning_attn_quadratic(q_rows.double(), *(r.double() for r in rows), g.double(), None,
                                         before[0][slot:slot + 1].double())
        assert rel(o[start:start + length], ro[0, offset:]) < TOL[dtype]
        done = (offset + length) // CHUNK * CHUNK  # rows folded into the state
        if done:
            _, rh = lightning_attn_quadratic(q_rows[:, :done].double(), *(r[:, :done].double() for r in rows),
                                             g.double(), None, before[0][slot:slot + 1].double())
            assert rel(state_pool[slot], rh[0]) < STATE_TOL[dtype]
        else:
            assert torch.equal(state_pool[slot], before[0][slot])
        kept = offset + length - done
        for pool, r in zip((chunk_k, chunk_v), rows):
            assert torch.equal(pool[slot, :kept], r[0, done:])
    assert torch.equal(state_pool[[1, 2]], before[0][[1, 2]])


def split_runs(q, k, v, g, policy, others):
    """The sequence's outputs and final pool rows when the engine runs it: calls that continue it from
    pool slot 2 in pieces of odd sizes (mid-chunk starts, 1-token steps, a piece completing a chunk, one
    crossing two boundaries), each packed after a piece of another sequence continuing from slot 0."""
    L = q.shape[0]
    state_pool, chunk_k, chunk_v = pools(4, q.dtype)
    state_pool[2] = 0  # the sequence's slot starts from zero, like a new request's; its chunk rows are noise
    pieces = [5, 1, 1, 57, 1, 3, 70, 1, 1]
    assert sum(pieces) == L
    outputs, position, other_position = [], 0, 30
    for size in pieces:
        other = 1 + size % 3
        x = [torch.cat([y[other_position:other_position + other], z[position:position + size]])
             for y, z in zip(others, (q, k, v))]
        o = lightning_aligned(*x, g, state_pool, chunk_k, chunk_v, ints(0, 2), ints(other_position, position),
                              ints(0, other), ints(other, size), policy=policy)
        outputs.append(o[other:])
        position, other_position = position + size, other_position + other
    return torch.cat(outputs), state_pool[2], chunk_k[2], chunk_v[2]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_sequence_gets_the_same_bits_however_it_is_run(policy, dtype):
    L = 140
    q, k, v, g = inputs(1, L, H, D, dtype)
    others = packed_rows(160, dtype, seed=1)[:3]  # tokens of the sequences run alongside

    alone, _ = lightning_attn(q, k, v, g, policy=policy)
    _, at_chunk_start = lightning_attn(q[:, :128], k[:, :128], v[:, :128], g, output_final_state=True,
                                       policy=policy)
    runs = {}
    o, final, rows_k, rows_v = split_runs(q[0], k[0], v[0], g, policy, others)
    runs["prefill pieces + decode steps"] = o
    assert torch.equal(final, at_chunk_start[0])
    assert torch.equal(rows_k[:L - 128], k[0, 128:]) and torch.equal(rows_v[:L - 128], v[0, 128:])

    cu = torch.tensor([0, 7, 7 + L, 7 + L + 100], device=DEVICE, dtype=torch.int32)  # between two documents
    packed = [torch.cat([y[None, :7], x, y[None, 7:107]], 1) for y, x in zip(others, (q, k, v))]
    runs["packed"] = lightning_attn(*packed, g, cu_seqlens=cu, policy=policy)[0][:, 7:7 + L]
    batch = [torch.cat([y[None, :L + 9], torch.nn.functional.pad(x, (0, 0, 0, 0, 0, 9))]) for y, x in
             zip(others, (q, k, v))]
    runs["row 1 of [2, T], right-padded"] = lightning_attn(*batch, g, policy=policy)[0][1:, :L]
    for name, o in runs.items():
        assert torch.equal(o.reshape(alone.shape), alone), name


@pytest.mark.parametrize("policy", POLICIES)
def test_a_verify_chain_writes_nothing_and_a_fold_advances_as_the_outputs_call(policy):
    """write=False leaves the pools as they were and gives the bits of the writing call; q=None (a
    fold of accepted tokens) leaves the pools as the call with outputs does."""
    q, k, v, g = packed_rows(30, torch.bfloat16)
    args = (ints(1, 3), ints(50, 64 + 60), ints(0, 20), ints(20, 10))
    pools_a, pools_b, pools_c = pools(4, q.dtype), pools(4, q.dtype), pools(4, q.dtype)
    verify = lightning_aligned(q, k, v, g, *pools_a, *args, write=False, policy=policy)
    assert all(torch.equal(x, y) for x, y in zip(pools_a, pools(4, q.dtype)))
    written = lightning_aligned(q, k, v, g, *pools_b, *args, policy=policy)
    assert lightning_aligned(None, k, v, g, *pools_c, *args, policy=policy) is None
    assert torch.equal(verify, written)
    assert all(torch.equal(x, y) for x, y in zip(pools_b, pools_c))
    assert not torch.equal(pools_b[0], pools_a[0])
    nothing, out = torch.zeros(0, dtype=torch.long, device=DEVICE), torch.full_like(q, 7.0)
    assert lightning_aligned(q, k, v, g, *pools_c, nothing, nothing, nothing, nothing, out=out, policy=policy) is out
    assert (out == 7).all() and all(torch.equal(x, y) for x, y in zip(pools_b, pools_c))  # no sequence: no change


@pytest.mark.parametrize("offsets", [None, [0, 1, 1, 70, 100]])
def test_gradients_match_float64_autograd(offsets):
    """Backward: the chunked kernels' (gradients need no invariance), through the aligned forward."""
    policy = KernelPolicy("triton", invariant=True)
    B, T = (2, 70) if offsets is None else (1, offsets[-1])
    N = B if offsets is None else len(offsets) - 1
    q, k, v, g = inputs(B, T, H, D, torch.float32, requires_grad=True)
    h0 = state(N, H, D, requires_grad=True)
    cu = None if offsets is None else torch.tensor(offsets, device=DEVICE)
    o, ht = lightning_attn(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu, policy=policy)
    gen = torch.Generator().manual_seed(2)
    do, dht = (torch.randn(x.shape, generator=gen).to(DEVICE) for x in (o, ht))
    grads = torch.autograd.grad((o * do).sum() + (ht * dht).sum(), [q, k, v, h0])
    ref_leaves = [x.detach().double().requires_grad_() for x in (q, k, v, h0)]
    ro, rh = reference(*ref_leaves[:3], g, ref_leaves[3], offsets)
    ref_grads = torch.autograd.grad((ro * do.double()).sum() + (rh * dht.double()).sum(), ref_leaves)
    for name, a, b in zip("q k v h0".split(), grads, ref_grads):
        assert rel(a, b) < 1e-4, name


def test_bad_inputs_are_one_line_errors():
    q, k, v, g = packed_rows(4, torch.float32)
    state_pool, chunk_k, chunk_v = pools(2, torch.float32)
    args = (ints(1), ints(3), ints(0), ints(4))
    with pytest.raises(ValueError, match="no batch-invariant form"):
        lightning_decode(q[:1], k[:1], v[:1], g, state_pool, ints(0), policy=KernelPolicy(invariant=True))
    with pytest.raises(ValueError, match="chunk_k and chunk_v must be pools"):
        lightning_aligned(q, k, v, g, state_pool, chunk_k[:, :16], chunk_v, *args)
    with pytest.raises(ValueError, match="k's dtype"):
        lightning_aligned(q, k, v, g, state_pool, chunk_k.double(), chunk_v.double(), *args)
    with pytest.raises(ValueError, match="positions must be"):
        lightning_aligned(q, k, v, g, state_pool, chunk_k, chunk_v, ints(1), ints(3, 4), ints(0), ints(4))
