"""Sparse mixture of experts: sigmoid router with a selection-only bias, group-limited top-k,
routed scaling, gated (SwiGLU or PowLU) experts and a shared expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import RingLinearConfig
from ..ops.moe import routed_experts
from ..ops.policy import KernelPolicy
from ..ops.routing import Routing, route
from .layers import MLP, at_least_fp32


class Router(nn.Module):
    """Chooses `num_experts_per_tok` experts per token and their weights.

    `expert_bias` shifts the scores for the choice only (aux-loss-free balancing); the weights are
    the unbiased scores of the chosen experts, normalised and scaled. The router runs in fp32 and
    `expert_bias` stays fp32 whatever dtype the model is cast to.
    """

    def __init__(self, config: RingLinearConfig):
        super().__init__()
        self.config = config
        E = config.num_experts
        self.weight = nn.Parameter(torch.empty(E, config.hidden_size))
        self.routing = Routing(config.num_experts_per_tok, config.n_group, config.topk_group,
                               config.score_function == "sigmoid", config.norm_topk_prob, config.routed_scaling_factor)
        self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32))
        # Tokens routed to each expert since the last optimizer step (forwards that build a graph in
        # training mode; `train.optimizer_step` turns it into the bias update and resets it).
        self.register_buffer("expert_load", torch.zeros(E, dtype=torch.float32), persistent=False)

    def _apply(self, fn, recurse=True):
        fp32 = {name: self._buffers.pop(name) for name in ("expert_bias", "expert_load")}
        super()._apply(fn, recurse)
        for name, buffer in fp32.items():
            moved = fn(buffer)
            self.register_buffer(name, moved if moved.dtype == buffer.dtype else buffer.to(moved.device),
                                 persistent=name == "expert_bias")
        return self

    def forward(self, x: Tensor, policy: KernelPolicy = KernelPolicy()) -> tuple[Tensor, Tensor]:
        """x [N, hidden] -> (weights [N, k] fp32, expert indices [N, k])."""
        c = self.config
        logits = F.linear(at_least_fp32(x), at_least_fp32(self.weight))
        bias = self.expert_bias if c.moe_router_enable_expert_bias else None
        weights, experts = route(logits, bias, self.routing, policy)
        if self.training and torch.is_grad_enabled():  # the load of the tokens a step trains on
            self.expert_load += torch.bincount(experts.flatten(), minlength=c.num_experts)
        return weights, experts

    @torch.no_grad()
    def update_bias(self, rate: float) -> None:
        """Aux-loss-free balancing (Ling 2.0's zero-centred form): raise the bias of under-loaded
        experts and lower it for over-loaded ones, `b += rate * (sign(e) - mean(sign(e)))` with
        `e = mean load - load`; then reset the load count."""
        error = torch.sign(self.expert_load.mean() - self.expert_load)
        self.expert_bias += rate * (error - error.mean())
        self.expert_load.zero_()


class Experts(nn.Module):
    """All routed experts' gated-MLP weights stacked on a leading expert dimension."""

    def __init__(self, config: RingLinearConfig):
        super().__init__()
        self.activation = config.hidden_act
        E, hidden, inter = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(E, inter, hidden))
        self.up_proj = nn.Parameter(torch.empty(E, inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(E, hidden, inter))

    def weight_scales(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """The 128×128 scales of e4m3 weights (`model.fp8.quantize_weights`), or None."""
        names = [f"{proj}_scale_inv" for proj in ("gate_proj", "up_proj", "down_proj")]
        return tuple(self._buffers[n] for n in names) if names[0] in self._buffers else None

    def forward(self, x: Tensor, weights: Tensor, experts: Tensor, policy: KernelPolicy) -> Tensor:
        """x [N, hidden], weights/experts [N, k] -> Σ_k weight · expert(x), summed in a fixed order
        (in fp32, or fp64 for an fp64 model: the router's dtype)."""
        return routed_experts(x, weights, experts, self.gate_proj, self.up_proj, self.down_proj, policy,
                              self.activation, self.weight_scales())


class MoE(nn.Module):
    def __init__(self, config: RingLinearConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config)
        if config.num_shared_experts > 0:
            self.shared_experts = MLP(config.hidden_size, config.shared_expert_intermediate_size, config.hidden_act)

    def forward(self, x: Tensor, policy: KernelPolicy) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, experts = self.gate(flat, policy)
        y = self.experts(flat, weights, experts, policy)
        if hasattr(self, "shared_experts"):
            y = y + self.shared_experts(flat, policy)
        return y.view_as(x)
