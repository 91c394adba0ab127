"""The routing kernel (`routing.route`'s Triton backend): one program per token reads its E logits
once and writes its k experts and weights, every step of `route_reference` in registers. The top-k
is k rounds of argmax (ties to the lower index) with the winner masked out; the group scores are each
group's best two choice values."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import next_power_of_2
from .routing import Routing


@triton.jit
def _route_kernel(logits, bias, weights, experts, stride, scale, E: tl.constexpr, G: tl.constexpr,
                  TOPK_GROUP: tl.constexpr, K: tl.constexpr, K_P2: tl.constexpr, SIGMOID: tl.constexpr,
                  HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, E)
    x = tl.load(logits + row * stride + e)
    if SIGMOID:
        s = 1.0 / (1.0 + tl.exp(-x))
    else:
        p = tl.exp(x - tl.max(x, 0))
        s = p / tl.sum(p, 0)
    c = s
    if HAS_BIAS:
        c = s + tl.load(bias + e)
    if G > 1:
        S: tl.constexpr = E // G
        grouped = tl.reshape(c, (G, S))
        col = tl.arange(0, S)
        best = tl.argmax(grouped, 1)
        second = tl.max(tl.where(col[None, :] == best[:, None], float("-inf"), grouped), 1)
        group_scores = tl.max(grouped, 1) + second
        g = tl.arange(0, G)
        keep = tl.zeros([G], dtype=tl.int32)
        for _ in tl.static_range(TOPK_GROUP):
            winner = tl.argmax(group_scores, 0)
            keep = tl.where(g == winner, 1, keep)
            group_scores = tl.where(g == winner, float("-inf"), group_scores)
        kept = tl.reshape(tl.broadcast_to(keep[:, None], (G, S)), (E,))
        c = tl.where(kept != 0, c, float("-inf"))
    slots = tl.arange(0, K_P2)
    chosen = tl.zeros([K_P2], dtype=tl.int64)
    w = tl.zeros([K_P2], dtype=tl.float32)
    for i in tl.static_range(K):
        j = tl.argmax(c, 0)
        chosen = tl.where(slots == i, j.to(tl.int64), chosen)
        w = tl.where(slots == i, tl.sum(tl.where(e == j, s, 0.0), 0), w)
        c = tl.where(e == j, float("-inf"), c)
    if NORMALIZE:
        w = w / (tl.sum(w, 0) + 1e-20)
    tl.store(weights + row * K + slots, w * scale, mask=slots < K)
    tl.store(experts + row * K + slots, chosen, mask=slots < K)


def route_triton(logits: Tensor, bias: Tensor | None, routing: Routing) -> tuple[Tensor, Tensor]:
    """logits [N, E] fp32 with unit stride over E (E and n_group powers of two: the rule table's test)."""
    N, E = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    weights = torch.empty(N, routing.top_k, device=logits.device, dtype=torch.float32)
    experts = torch.empty(N, routing.top_k, device=logits.device, dtype=torch.long)
    if N:
        _route_kernel[(N,)](logits, logits if bias is None else bias, weights, experts, logits.stride(0),
                            float(routing.scale), E=E, G=routing.n_group, TOPK_GROUP=routing.topk_group,
                            K=routing.top_k, K_P2=next_power_of_2(routing.top_k), SIGMOID=routing.sigmoid,
                            HAS_BIAS=bias is not None, NORMALIZE=routing.normalize and routing.top_k > 1,
                            num_warps=4 if E >= 256 else 1)
    return weights, experts
