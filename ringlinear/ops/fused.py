"""Chains of elementwise ops (norms, RoPE, the gated activations SwiGLU and PowLU) compiled into one kernel on CUDA.

Run op by op, each op of a norm, RoPE or gate reads and writes the whole activation, and in a
Ring-mini prefill these chains took more GPU time than the matrix products. `fused` compiles such a
function with inductor where the kernel policy says so (`ops.policy.compiles_chain`: CUDA
activations of at least COMPILE_MIN_ELEMENTS, not in invariant mode, whose reductions must keep their
fixed form); everywhere else it runs eagerly. `TORCH_COMPILE_DISABLE=1` turns it all off.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .policy import KernelPolicy, compiles_chain


def fused(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """`fn(x, *args)` as `fn(x, *args, policy=...)`: compiled or eager as the policy decides for x."""
    @functools.cache
    def compiled() -> Callable[..., Tensor]:  # made on first use: the CPU never imports the compiler
        return torch.compile(fn, dynamic=True)

    @functools.wraps(fn)
    def run(x: Tensor, *args, policy: KernelPolicy) -> Tensor:
        return (compiled() if compiles_chain(policy, x) else fn)(x, *args)
    return run


# PowLU's exponent m, the value the paper recommends (its ablation: m = 2, 3, 4 within 0.002 of loss).
POWLU_EXPONENT = 3.0


def powlu_gate(z: Tensor) -> Tensor:
    """PowLU's gate (Jiang et al., arXiv 2605.25704, Eq. 1 in gated form): `z^(m/(√z+1)) · σ(z)` for
    z > 0 and SiLU(z) below, so `x · gate(x)` grows like x for large x instead of SwiGLU's x².
    Computed in fp32 (fp64 kept); the base is clamped so that the branch `where` discards never
    makes a NaN gradient."""
    z32 = z.to(torch.promote_types(z.dtype, torch.float32))
    base = z32.clamp_min(torch.finfo(z32.dtype).tiny)
    positive = torch.exp(POWLU_EXPONENT * torch.log(base) / (base.sqrt() + 1)) * torch.sigmoid(z32)
    return torch.where(z32 > 0, positive, F.silu(z32)).to(z.dtype)


GATES = {"silu": F.silu, "powlu": powlu_gate}


@fused
def glu(gate: Tensor, up: Tensor, scales: Tensor | None = None, activation: str = "silu") -> Tensor:
    """act(gate) * up (act: "silu" for SwiGLU, "powlu"), each row times its scale (fp32, applied
    before rounding) if given."""
    h = GATES[activation](gate) * up
    return h if scales is None else (h * scales[:, None]).to(h.dtype)
