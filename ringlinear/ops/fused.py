"""Chains of elementwise ops compiled into one kernel on CUDA.

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


@fused
def swiglu(gate: Tensor, up: Tensor, scales: Tensor | None = None) -> Tensor:
    """silu(gate) * up, each row times its scale (fp32, applied before rounding) if given."""
    h = F.silu(gate) * up
    return h if scales is None else (h * scales[:, None]).to(h.dtype)
