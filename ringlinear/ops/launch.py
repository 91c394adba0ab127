"""Host-side helpers of the kernel launchers: an eager prefill step runs hundreds of launches, so
their host time is what a short prompt waits for.

`cdiv` and `next_power_of_2` replace `triton.cdiv` and `triton.next_power_of_2`, Triton constexpr
functions of several microseconds of host time a call (a fifth of an invariant GEMM's host time before
its launch). `needs_grad` lets an op launch its kernels directly when autograd need not record it,
skipping `autograd.Function`'s host time."""

import torch
from torch import Tensor


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ≥ n (1 for n ≤ 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def needs_grad(*xs: Tensor | None) -> bool:
    """Whether autograd must record an op on these inputs."""
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)
