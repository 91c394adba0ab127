"""Draft-tree verification and the accepted-path fold for Lightning attention: the torch reference and
the Triton kernels (through the interpreter on a CPU) against a float64 loop over the formula, a chain
against lightning_attn, and the fold and the invariant form against decode steps, bit for bit."""

import pytest
import torch
from conftest import INTERPRET

from ringlinear.ops.lightning import (
    lightning_attn,
    lightning_decode,
    lightning_tree_fold,
    lightning_tree_verify,
)
from ringlinear.ops.policy import KernelPolicy, triton_installed
from ringlinear.ops.tree import tree_ancestors

DEVICE = "cpu" if INTERPRET else "cuda"
TORCH, TRITON = KernelPolicy("torch"), KernelPolicy("triton")
POLICIES = [TORCH, pytest.param(TRITON, marks=pytest.mark.skipif(not triton_installed(), reason="no Triton"))]
H, D = 2, 64
LOG_DECAY = -torch.tensor([0.6931, 2.0**-8])  # strong (λ = 0.5) and weak decay


def random_trees(sizes, seed=0):
    """parents (tree-local, -1 for the first token of each tree, some later roots too) and query_start."""
    gen = torch.Generator().manual_seed(seed)
    parents = []
    for m in sizes:
        parents += [-1] + [int(torch.randint(-1 if i > 2 else 0, i, (), generator=gen)) for i in range(1, m)]
    query_start = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    return torch.tensor(parents), query_start


def inputs(T, N, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(T, H, D, generator=gen).to(DEVICE, dtype) for _ in range(3))
    state = torch.randn(N + 2, H, D, D, generator=gen).to(DEVICE)
    slots = torch.randperm(N + 2, generator=gen)[:N].to(DEVICE)
    return q, k, v, state, slots


def loop_reference(q, k, v, state, slots, parents, query_start):
    """o_i = scale·q_i·(λ^(d_i+1) S + Σ_{j ⪯ i} λ^(d_i-d_j) k_jᵀ v_j) in float64, token by token."""
    q, k, v, state = (x.double().cpu() for x in (q, k, v, state))
    lam = LOG_DECAY.double().exp()[:, None, None]
    out = torch.empty_like(q)
    for n in range(len(query_start) - 1):
        start, end = int(query_start[n]), int(query_start[n + 1])
        for i in range(start, end):
            path = [i]
            while parents[path[-1]] >= 0:
                path.append(start + int(parents[path[-1]]))
            d = len(path) - 1
            s = lam ** (d + 1) * state[int(slots[n])]
            for depth_j, j in enumerate(reversed(path)):
                s = s + lam ** (d - depth_j) * k[j][:, :, None] * v[j][:, None, :]
            out[i] = D**-0.5 * (q[i][:, None, :] @ s)[:, 0]
    return out


def rel(out, ref):
    assert torch.isfinite(out).all()
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


def test_tree_ancestors_of_a_small_forest():
    # tree 0: 0 -> {1, 2}, 2 -> 3; tree 1: roots 0 and 2, 0 -> 1
    parents, query_start = torch.tensor([-1, 0, 0, 2, -1, 0, -1]), torch.tensor([0, 4, 7])
    ancestors, depth = tree_ancestors(parents, query_start, max_tree_len=4)
    assert ancestors.tolist() == [0b1, 0b11, 0b101, 0b1101, 0b1, 0b11, 0b100]
    assert depth.tolist() == [0, 1, 1, 2, 0, 1, 0]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_verify_matches_the_float64_loop(policy, dtype):
    sizes = [5, 16, 1]
    parents, query_start = random_trees(sizes)
    q, k, v, state, slots = inputs(sum(sizes), len(sizes), dtype)
    before = state.clone()
    ancestors, depth = tree_ancestors(parents.to(DEVICE), query_start.to(DEVICE), max(sizes))
    o = lightning_tree_verify(q, k, v, LOG_DECAY.to(DEVICE), state, slots, ancestors, depth, query_start.to(DEVICE),
                              max(sizes), policy=policy)
    assert o.dtype == dtype
    assert rel(o, loop_reference(q, k, v, state, slots, parents, query_start)) < (1e-5 if dtype == torch.float32
                                                                                 else 1e-2)
    assert torch.equal(state, before)  # drafts leave no trace


def test_the_torch_reference_is_exact_in_float64():
    sizes = [7, 3]
    parents, query_start = random_trees(sizes, seed=3)
    q, k, v, state, slots = (x.cpu() for x in inputs(sum(sizes), 2, torch.float64))
    state = state.double()
    ancestors, depth = tree_ancestors(parents, query_start, 7)
    o = lightning_tree_verify(q, k, v, LOG_DECAY.double(), state, slots.cpu(), ancestors, depth, query_start, 7,
                              policy=TORCH)
    assert rel(o, loop_reference(q, k, v, state, slots, parents, query_start)) < 1e-12


@pytest.mark.parametrize("policy", POLICIES)
def test_a_chain_equals_lightning_attn_on_the_same_tokens(policy):
    m = 9
    parents, query_start = torch.tensor([-1, *range(m - 1)]), torch.tensor([0, m])
    q, k, v, state, slots = inputs(m, 1, torch.float32)
    ancestors, depth = tree_ancestors(parents.to(DEVICE), query_start.to(DEVICE), m)
    o = lightning_tree_verify(q, k, v, LOG_DECAY.to(DEVICE), state, slots, ancestors, depth, query_start.to(DEVICE),
                              m, policy=policy)
    expected, _ = lightning_attn(q[None], k[None], v[None], LOG_DECAY.to(DEVICE), initial_state=state[slots],
                                 policy=policy)
    assert rel(o, expected[0].double().cpu()) < 1e-5


@pytest.mark.parametrize("policy", POLICIES)
def test_folding_the_accepted_path_is_decoding_it_bit_for_bit(policy):
    q, k, v, state, slots = inputs(10, 2, torch.float32)
    paths = [[0, 3], [6]]  # rows along T, root first (sequence 1 accepts its root only)
    accepted = torch.tensor([[0, 3], [6, 0]], device=DEVICE)
    folded = state.clone()
    lightning_tree_fold(k, v, LOG_DECAY.to(DEVICE), folded, slots, accepted, torch.tensor([2, 1], device=DEVICE),
                        policy=policy)
    decoded = state.clone()
    for n, path in enumerate(paths):
        for row in path:
            lightning_decode(q[row:row + 1], k[row:row + 1], v[row:row + 1], LOG_DECAY.to(DEVICE), decoded,
                             slots[n:n + 1], policy=policy)
    assert torch.equal(folded, decoded)
    assert not torch.equal(folded, state)


@pytest.mark.parametrize("policy", [KernelPolicy("torch", invariant=True), KernelPolicy("triton", invariant=True)])
def test_invariant_verify_gives_each_token_the_bits_of_decoding_its_root_path(policy):
    sizes = [5, 3]
    parents, query_start = random_trees(sizes, seed=4)
    q, k, v, state, slots = inputs(sum(sizes), 2, torch.float32)
    ancestors, depth = tree_ancestors(parents.to(DEVICE), query_start.to(DEVICE), 5)
    o = lightning_tree_verify(q, k, v, LOG_DECAY.to(DEVICE), state, slots, ancestors, depth, query_start.to(DEVICE),
                              5, policy=policy)
    for n in range(2):
        start = int(query_start[n])
        for i in range(start, int(query_start[n + 1])):
            path = [i]
            while parents[path[-1]] >= 0:
                path.append(start + int(parents[path[-1]]))
            pool = state[slots[n:n + 1]].clone()
            for row in reversed(path):
                decoded = lightning_decode(q[row:row + 1], k[row:row + 1], v[row:row + 1], LOG_DECAY.to(DEVICE),
                                           pool, torch.zeros(1, dtype=torch.long, device=DEVICE), policy=policy)
            assert torch.equal(o[i], decoded[0])


def test_bad_trees_are_clear_errors():
    q, k, v, state, slots = (x.cpu() for x in inputs(4, 1, torch.float32))
    parents, query_start = torch.tensor([-1, 0, 1, 2]), torch.tensor([0, 4])
    ancestors, depth = tree_ancestors(parents, query_start, 4)
    with pytest.raises(ValueError, match="max_tree_len"):
        lightning_tree_verify(q, k, v, LOG_DECAY, state, slots.cpu(), ancestors, depth, query_start, 65)
    with pytest.raises(ValueError, match="at most 64"):
        tree_ancestors(parents, query_start, 65)
    with pytest.raises(ValueError, match="ancestors and depth"):
        lightning_tree_verify(q, k, v, LOG_DECAY, state, slots.cpu(), ancestors[:3], depth, query_start, 4)
