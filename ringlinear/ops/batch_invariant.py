"""Batch-invariant numerics: under an invariant `KernelPolicy`, a token's numbers do not depend on what
else is in the batch, so the training forward over whole sequences and an engine step that mixes
prefill chunks with other requests' decodes give bit-identical logits.

Kernels compute a row differently depending on the rows that come with it: BLAS libraries pick a
GEMM kernel (and a split of the reduction) by shape, and on the CPU a 1-row product takes another
path than a 64-row one; GPU reductions spread a row over more threads when there are few rows; CPU
elementwise loops finish a tensor's last partial vector with a scalar routine whose `sigmoid`
differs from the vector one in the last bit. In this mode:

- matrix products (`F.linear`, `@`, `torch.bmm`) run as products of one fixed shape: the rows
  (or, batched, the matrices) are padded to a multiple of `ROWS` and computed `ROWS` at a time;
- reductions over the last dimension (`sum`, `mean`, `softmax`, `log_softmax`) run on the same
  fixed row blocks; sums over another dimension are folded in index order;
- `sigmoid` and `silu` are composed from `exp` and IEEE division, which every code path computes
  alike;
- `topk` gives what a stable sort would: ties go to the lower index (the MoE router's choice), by an
  exact selection over unique integer keys (no sort);
- the attention ops take forms whose per-token order is fixed (`ops.lightning`: the state advanced
  token by token, the same code for training, prefill and decode; `ops.attention`: an online
  softmax over fixed blocks of `KEY_BLOCK` keys).

On the Triton backend (`policy.KernelPolicy`), fp16, bf16 and fp32 tensors take Triton kernels that
are invariant by construction, one launch where the blocks above take thousands
(`ops.invariant_kernels`: products whose tile and split of K never depend on the rows, a program per row
(or per fixed chunk of a long row) for sums and softmax, one per tile of a sequence's queries for the
attention); everything else (the torch backend, fp64) takes
the fixed-shape blocks.

The generic ops are switched by `InvariantMode`, a `TorchFunctionMode` that `numerics(policy)` enters
for an invariant policy (the model's forward does, for its whole body), so the model's code is the
same in both modes; the attention, Lightning and MoE ops choose their form from the policy they are
given. Backward passes run outside it (their numerics need no invariance).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .policy import KERNEL_DTYPES, KernelPolicy

ROWS = 16  # rows (or matrices) per product and per reduction call
# keys per block of the batch-invariant attention (blocks at fixed positions from a sequence's start; a
# block may span pages): the tile of its kernel's tensor-core products, for training and the engine alike
KEY_BLOCK = 64


def fold_sum(x: Tensor, dim: int) -> Tensor:
    """Sum over `dim` as a left fold in index order, whatever the shape of the rest of `x`."""
    parts = x.unbind(dim)
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def _in_blocks(fn: Callable[..., Tensor], *xs: Tensor, last: int = 1) -> Tensor:
    """fn over rows of the tensors `xs` (a row: their `last` trailing dims; the leading dims, the
    same for all, are flattened), ROWS rows per call, the last call zero-padded: one shape per call."""
    lead = xs[0].shape[:xs[0].dim() - last]
    # contiguous: a reshape may return a strided view (when a leading dim has size 1) or a copy, and
    # the kernel a library picks, so the rounding, follows the operands' strides
    rows = [x.reshape(-1, *x.shape[x.dim() - last:]).contiguous() for x in xs]
    n = rows[0].shape[0]
    if n % ROWS:
        rows = [torch.cat([r, r.new_zeros(-n % ROWS, *r.shape[1:])]) for r in rows]
    out = torch.cat([fn(*block) for block in zip(*(r.split(ROWS) for r in rows))])[:n]
    return out.reshape(*lead, *out.shape[1:])


def _linear(policy: KernelPolicy, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    if policy.triton(x, weight):
        from .invariant_kernels import invariant_linear
        out = invariant_linear(x, weight)
    else:
        out = _in_blocks(lambda rows: torch.mm(rows, weight.t()), x)
    return out if bias is None else out + bias


def _matmul(policy: KernelPolicy, a: Tensor, b: Tensor) -> Tensor:
    if a.dim() < 2 or b.dim() < 2:
        raise NotImplementedError("batch-invariant matmul takes matrices, not vectors")
    if policy.triton(a, b):
        return _matmul_on_kernels(a, b)
    if b.dim() == 2:
        return _in_blocks(lambda rows: torch.mm(rows, b), a)
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return _in_blocks(torch.bmm, a.expand(*batch, *a.shape[-2:]), b.expand(*batch, *b.shape[-2:]), last=2)


def _matmul_on_kernels(a: Tensor, b: Tensor) -> Tensor:
    """Rows of a times b; batched, matrix i of the batch is group i of a grouped product."""
    from .invariant_kernels import invariant_grouped_mm, invariant_linear
    if b.dim() == 2:
        return invariant_linear(a, b.t())
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    (M, K), N = a.shape[-2:], b.shape[-1]
    a, b = a.expand(*batch, M, K).reshape(-1, K), b.expand(*batch, K, N).reshape(-1, K, N)
    counts = torch.full((b.shape[0],), M, device=a.device)
    return invariant_grouped_mm(a, b.transpose(1, 2), counts).view(*batch, M, N)


def _reduction(name: str) -> Callable[..., Tensor]:
    original = getattr(torch, name)

    def reduce(policy: KernelPolicy, x: Tensor, dim: int | tuple[int, ...] | None = None, keepdim: bool = False,
               dtype: torch.dtype | None = None) -> Tensor:
        x = x if dtype is None else x.to(dtype)
        dims = [dim] if isinstance(dim, int) else list(dim or [])
        if len(dims) != 1 or not x.is_floating_point():  # whole-tensor or integer reductions
            return original(x) if dim is None else original(x, dim, keepdim=keepdim)
        d = dims[0] % x.dim()
        if d == x.dim() - 1 and policy.triton(x):
            from .invariant_kernels import row_sum
            total = row_sum(x, mean=name == "mean")
            return total.unsqueeze(-1) if keepdim else total
        if d == x.dim() - 1:
            return _in_blocks(lambda rows: original(rows, -1, keepdim=keepdim), x)
        total = fold_sum(x, d)
        if name == "mean":
            total = total / x.shape[d]
        return total.unsqueeze(d) if keepdim else total
    return reduce


def _softmax(name: str) -> Callable[..., Tensor]:
    original = getattr(torch, name)

    def normalise(policy: KernelPolicy, x: Tensor, dim: int, _stacklevel: int = 3,
                  dtype: torch.dtype | None = None) -> Tensor:
        if dim % x.dim() != x.dim() - 1:
            raise NotImplementedError(f"batch-invariant {name} runs over the last dimension")
        if policy.triton(x) and (dtype is None or dtype in KERNEL_DTYPES):
            from .invariant_kernels import softmax
            return softmax(x, log=name == "log_softmax", dtype=dtype)
        return _in_blocks(lambda rows: original(rows, -1, dtype=dtype), x)
    return normalise


def _sigmoid(policy: KernelPolicy, x: Tensor) -> Tensor:
    return 1 / (1 + torch.exp(-x))


def _silu(policy: KernelPolicy, x: Tensor, inplace: bool = False) -> Tensor:
    return x * _sigmoid(policy, x)


def _topk(policy: KernelPolicy, x: Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True):
    """topk as a stable sort would give it (ties to the lower index, the result sorted), without the sort:
    an exact selection over one integer key per element that orders the values and, among equal ones, the
    indices. The keys are unique, so every selection algorithm (whatever it picks by shape) gives the
    same answer. Floats wider than fp32, integers and rows of 2³¹ or more elements take the stable sort."""
    if x.dtype not in KERNEL_DTYPES or x.dim() == 0 or x.shape[dim] >= 2**31:
        values, indices = x.sort(dim=dim, descending=largest, stable=True)
        return torch.return_types.topk((values.narrow(dim, 0, k), indices.narrow(dim, 0, k)))
    dim %= x.dim()
    if k == 0:  # the sampler's when no top log-probs are asked: no keys to build over the vocabulary
        nothing = x.narrow(dim, 0, 0)
        return torch.return_types.topk((nothing, torch.zeros_like(nothing, dtype=torch.long)))
    n = x.shape[dim]
    index = torch.arange(n, device=x.device).view(-1, *[1] * (x.dim() - 1 - dim))
    keys = order_keys(x).to(torch.int64) * 2**32 + (n - 1 - index if largest else index)
    indices = keys.topk(k, dim=dim, largest=largest, sorted=True).indices
    return torch.return_types.topk((x.gather(dim, indices), indices))


def order_keys(x: Tensor) -> Tensor:
    """int32 keys of fp16, bf16 or fp32 values in the order torch.sort gives them: -0.0 equals +0.0 and
    NaN (of either sign) is above +inf. An fp32 value's bits as an integer order the positive values; the
    negative ones' magnitude bits are flipped so that they order the other way."""
    f = x.float()  # exact for fp16 and bf16
    f = torch.where(f == 0, 0.0, torch.where(f.isnan(), float("nan"), f))
    bits = f.view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


_OVERRIDES: dict[Callable, Callable] = {
    F.linear: _linear,
    torch.matmul: _matmul, Tensor.matmul: _matmul, Tensor.__matmul__: _matmul, torch.bmm: _matmul,
    torch.sigmoid: _sigmoid, Tensor.sigmoid: _sigmoid, F.silu: _silu,
    torch.topk: _topk, Tensor.topk: _topk,
    **{f: _reduction(name) for name in ("sum", "mean") for f in (getattr(torch, name), getattr(Tensor, name))},
    **{f: _softmax(name) for name in ("softmax", "log_softmax")
       for f in (getattr(torch, name), getattr(Tensor, name), getattr(F, name))},
}


class InvariantMode(TorchFunctionMode):
    """The generic ops in their batch-invariant forms, on the kernels or blocks `policy` picks."""

    def __init__(self, policy: KernelPolicy):
        super().__init__()
        self.policy = policy

    def __torch_function__(self, func, types, args=(), kwargs=None):
        override = _OVERRIDES.get(func)
        if override is None:
            return func(*args, **(kwargs or {}))
        return override(self.policy, *args, **(kwargs or {}))


@contextlib.contextmanager
def numerics(policy: KernelPolicy) -> Iterator[None]:
    """Generic torch ops in their batch-invariant forms while inside, if `policy.invariant`; else nothing."""
    if not policy.invariant:
        yield
        return
    with InvariantMode(policy):
        yield
