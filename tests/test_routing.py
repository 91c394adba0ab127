"""MoE routing: the Triton kernel (through the interpreter on the CPU) against the PyTorch reference,
choices, weights and gradients, and the rule that picks it."""

import pytest
import torch

from ringlinear.ops.policy import KernelPolicy, routing_kernel
from ringlinear.ops.routing import Routing, route, route_reference

TRITON = KernelPolicy("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RING_MINI = Routing(top_k=8, n_group=8, topk_group=4, sigmoid=True, normalize=True, scale=2.5)
CASES = {"ring-mini (256 experts, 8 groups)": (256, RING_MINI, True),
         "softmax, no groups": (64, Routing(top_k=4, sigmoid=False, normalize=False), False),
         "one expert a token": (16, Routing(top_k=1, n_group=4, topk_group=2, scale=1.5), True)}


def inputs(N: int, E: int, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, E, generator=g) * 2).to(DEVICE)
    return logits, (torch.randn(E, generator=g) * 0.1).to(DEVICE) if bias else None


def test_a_tokens_choice_does_not_depend_on_the_other_tokens():
    logits, bias = inputs(23, 256, True, seed=3)
    weights, experts = route(logits, bias, RING_MINI, TRITON)
    alone = route(logits[7:8], bias, RING_MINI, TRITON)
    assert torch.equal(alone[0], weights[7:8]) and torch.equal(alone[1], experts[7:8])


@pytest.mark.parametrize("case", list(CASES))
def test_the_kernel_chooses_and_weighs_as_the_reference(case):
    E, routing, bias = CASES[case]
    logits, b = inputs(37, E, bias)
    assert routing_kernel(TRITON, logits, routing.n_group) == "triton"
    weights, experts = route(logits, b, routing, TRITON)
    ref_weights, ref_experts = route_reference(logits, b, routing)
    assert experts.dtype == torch.long and torch.equal(experts, ref_experts)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-6, atol=1e-7)
    if routing.n_group > 1:  # every chosen expert lies in one of the topk_group kept groups
        groups = experts // (E // routing.n_group)
        assert all(len(set(row)) <= routing.topk_group for row in groups.tolist())


def test_the_kernels_gradient_is_the_references():
    logits, b = inputs(19, 256, True, seed=1)
    upstream = torch.randn(19, 8, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    grads = []
    for policy in (TRITON, KernelPolicy("torch")):
        x = logits.clone().requires_grad_()
        weights, _ = route(x, b, RING_MINI, policy)
        (weights * upstream).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_ties_go_to_the_lower_index_and_no_rows_is_no_work():
    logits = torch.zeros(3, 256, device=DEVICE)
    weights, experts = route(logits, None, RING_MINI, TRITON)
    assert experts.tolist() == [list(range(8))] * 3  # equal groups and experts: the first ones
    torch.testing.assert_close(weights, torch.full((3, 8), 2.5 / 8, device=DEVICE))
    weights, experts = route(torch.zeros(0, 256, device=DEVICE), None, RING_MINI, TRITON)
    assert weights.shape == experts.shape == (0, 8)


def test_the_rule_takes_the_reference_where_the_kernel_does_not_apply():
    logits = torch.zeros(2, 256)
    assert routing_kernel(KernelPolicy("triton", invariant=True), logits, 8) == "triton"  # a row alone
    assert routing_kernel(KernelPolicy("torch", invariant=True), logits, 8) == "reference"
    assert routing_kernel(TRITON, logits.double(), 8) == "reference"
    assert routing_kernel(TRITON, torch.zeros(2, 96), 8) == "reference"  # not a power of two
    assert routing_kernel(KernelPolicy("torch"), logits, 8) == "reference"
    with pytest.raises(ValueError, match="does not fit 256 experts"):
        route(logits, None, Routing(top_k=8, n_group=3), TRITON)
