"""Cross-entropy of a linear head without the [N, V] fp32 logits.

The logits of `chunk_rows` rows at a time are computed, reduced to the summed loss and turned into
their gradient right away (softmax − one-hot), which is multiplied into the gradients of the hidden
states and of the head weight. Backward then only scales those by the incoming gradient: no
recomputation, and at most one chunk of fp32 logits alive. At V = 157K and T = 32K the whole
[T, V] logits and their gradient would be 40 GB.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100
LOGITS_PER_CHUNK = 2**27  # fp32 logits of one chunk: 512 MiB


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int, needs_grad: bool) -> Tensor:
        fp = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for a float64 check
        total = torch.zeros((), dtype=fp, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if needs_grad else None
        grad_weight = torch.zeros_like(weight, dtype=fp) if needs_grad else None
        for start in range(0, hidden.shape[0], chunk_rows):
            h, t = hidden[start:start + chunk_rows], targets[start:start + chunk_rows]
            logits = (h @ weight.T).to(fp)
            valid = t != IGNORE_INDEX
            picked = t.clamp_min(0)[:, None]
            lse = logits.logsumexp(-1)
            total += ((lse - logits.gather(1, picked)[:, 0]) * valid).sum()
            if needs_grad:
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                grad.scatter_add_(1, picked, -valid[:, None].to(fp))
                grad = (grad * valid[:, None]).to(h.dtype)
                grad_hidden[start:start + chunk_rows] = grad @ weight
                grad_weight += grad.T @ h
        if needs_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_output.to(grad_hidden.dtype), grad_weight * grad_output.to(grad_weight.dtype),
                None, None, None)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """Σ over rows with a target of cross_entropy(hidden @ weightᵀ, target), in at least fp32.
    hidden [N, d], weight [V, d], targets [N] (IGNORE_INDEX = no target)."""
    chunk_rows = max(1, LOGITS_PER_CHUNK // weight.shape[0])
    # ctx.needs_input_grad follows requires_grad even under no_grad (validation): ask the grad mode too
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, needs_grad)
