"""Chains of elementwise ops compiled into one kernel on CUDA.

Run op by op, each op of a norm, RoPE or gate reads and writes the whole activation, and in a
Ring-mini prefill these chains took more GPU time than the matrix products. `fused` compiles such
a function with inductor for CUDA activations of at least `MIN_ELEMENTS` (prefill chunks,
training): a compiled call costs more host time than the few launches it replaces, which a small
step, launch-bound, would feel. Small activations, the CPU, and `batch_invariant()` (whose
reductions must keep their fixed form) run eagerly. `TORCH_COMPILE_DISABLE=1` turns it all off.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import batch_invariant

MIN_ELEMENTS = 1 << 22  # 2,048 tokens of a 2,048-wide activation


def fused(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    @functools.cache
    def compiled() -> Callable[..., Tensor]:  # made on first use: the CPU never imports the compiler
        return torch.compile(fn, dynamic=True)

    @functools.wraps(fn)
    def run(x: Tensor, *args) -> Tensor:
        if x.is_cuda and x.numel() >= MIN_ELEMENTS and not batch_invariant.enabled():
            return compiled()(x, *args)
        return fn(x, *args)
    return run


@fused
def swiglu(gate: Tensor, up: Tensor, scales: Tensor | None = None) -> Tensor:
    """silu(gate) * up, each row times its scale (fp32, applied before rounding) if given."""
    h = F.silu(gate) * up
    return h if scales is None else (h * scales[:, None]).to(h.dtype)
