"""MoE routing from the router's logits: scores, group-limited top-k, weights.

For each token (a row of logits [N, E], fp32): scores s = sigmoid(logits) (or softmax); the choice
adds the selection-only `bias`; with n_group > 1 only the `topk_group` groups whose two best choice
values sum highest stay; the k best remaining experts are chosen; their weights are their unbiased
scores, normalised to sum 1 (`normalize`, when k > 1) and multiplied by `scale`. Returns (weights
[N, k] fp32, experts [N, k] int64), best first.

`route_reference` is that in PyTorch (eight launches or so a layer, topk twice); `route` takes the
Triton kernel, one program per token doing it all, where the rule table says so (`ops.policy`; in
invariant mode too, since a token's numbers never depend on the other rows), with a PyTorch backward
from the saved experts. Both take the top-k by value, ties to the lower index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .policy import KernelPolicy, routing_kernel


@dataclass(frozen=True)
class Routing:
    """The router's settings (the config's fields of the same meaning)."""
    top_k: int
    n_group: int = 1
    topk_group: int = 1
    sigmoid: bool = True  # else softmax
    normalize: bool = True
    scale: float = 1.0


def scores_of(logits: Tensor, routing: Routing) -> Tensor:
    return torch.sigmoid(logits) if routing.sigmoid else logits.softmax(-1)


def weights_of(scores: Tensor, experts: Tensor, routing: Routing) -> Tensor:
    weights = scores.gather(-1, experts)
    if routing.normalize and routing.top_k > 1:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * routing.scale


def route_reference(logits: Tensor, bias: Tensor | None, routing: Routing) -> tuple[Tensor, Tensor]:
    scores = scores_of(logits, routing)
    choice = scores if bias is None else scores + bias
    if routing.n_group > 1:
        grouped = choice.unflatten(-1, (routing.n_group, -1))
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        kept = group_scores.topk(routing.topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(-1, kept, True)
        choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).flatten(-2)
    experts = choice.topk(routing.top_k, dim=-1).indices
    return weights_of(scores, experts, routing), experts


def route(logits: Tensor, bias: Tensor | None, routing: Routing,
          policy: KernelPolicy = KernelPolicy()) -> tuple[Tensor, Tensor]:
    """logits [N, E] (fp32 or fp64), bias [E] fp32 or None -> (weights [N, k], experts [N, k])."""
    if logits.dim() != 2:
        raise ValueError(f"router logits must be [N, E], got {list(logits.shape)}")
    E = logits.shape[1]
    if E % routing.n_group or not 1 <= routing.topk_group <= routing.n_group or not 1 <= routing.top_k <= E:
        raise ValueError(f"routing {routing} does not fit {E} experts")
    if bias is not None and bias.shape != (E,):
        raise ValueError(f"expert bias must be [E]=[{E}], got {list(bias.shape)}")
    match routing_kernel(policy, logits, routing.n_group):
        case "triton":
            return _Route.apply(logits, bias, routing)
        case "reference":
            return route_reference(logits, bias, routing)


class _Route(torch.autograd.Function):
    """The kernel's choice; the weights' gradient through PyTorch's scores of the chosen experts."""

    @staticmethod
    def forward(ctx, logits: Tensor, bias: Tensor | None, routing: Routing) -> tuple[Tensor, Tensor]:
        from .routing_kernel import route_triton
        weights, experts = route_triton(logits, bias, routing)
        ctx.save_for_backward(logits, experts)
        ctx.routing = routing
        ctx.mark_non_differentiable(experts)
        return weights, experts

    @staticmethod
    def backward(ctx, grad_weights: Tensor, grad_experts: Tensor | None):
        logits, experts = ctx.saved_tensors
        with torch.enable_grad():
            x = logits.detach().requires_grad_()
            weights = weights_of(scores_of(x, ctx.routing), experts, ctx.routing)
            (grad,) = torch.autograd.grad(weights, x, grad_weights)
        return grad, None, None
