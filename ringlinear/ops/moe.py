"""Expert computation over token rows grouped by expert.

Two forms with one signature: the reference loops over experts (it reads the row counts on the
host); the grouped form runs each projection as one `torch._grouped_mm` over all experts with the
group offsets on the device, so it never synchronises and can be captured in a CUDA graph. CUDA
bfloat16 takes the grouped form; everything else takes the loop, and so does anything under
`batch_invariant()`, which turns the loop's products into products of one fixed shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import batch_invariant


def grouped_swiglu(x: Tensor, gate: Tensor, up: Tensor, down: Tensor, counts: Tensor) -> Tensor:
    """SwiGLU of each expert over its rows: x [M, hidden] sorted by expert, `counts[e]` rows for
    expert e; gate/up [E, inter, hidden], down [E, hidden, inter]. Returns [M, hidden]."""
    if x.is_cuda and x.dtype == torch.bfloat16 and not batch_invariant.enabled():
        return grouped_swiglu_grouped_mm(x, gate, up, down, counts)
    return grouped_swiglu_loop(x, gate, up, down, counts)


def grouped_swiglu_loop(x: Tensor, gate: Tensor, up: Tensor, down: Tensor, counts: Tensor) -> Tensor:
    outputs = []
    # unbind, not gate[e]: indexing's backward would fill a zero gradient of all E experts per expert
    for rows, g, u, d in zip(x.split(counts.tolist()), gate.unbind(), up.unbind(), down.unbind()):
        if rows.shape[0]:
            outputs.append(F.linear(F.silu(F.linear(rows, g)) * F.linear(rows, u), d))
    return torch.cat(outputs) if outputs else x.new_zeros(0, down.shape[1])


def grouped_swiglu_grouped_mm(x: Tensor, gate: Tensor, up: Tensor, down: Tensor, counts: Tensor) -> Tensor:
    offsets = counts.cumsum(0).to(torch.int32)  # end row of each expert's group
    h = F.silu(torch._grouped_mm(x, gate.transpose(1, 2), offs=offsets))
    h = h * torch._grouped_mm(x, up.transpose(1, 2), offs=offsets)
    return torch._grouped_mm(h, down.transpose(1, 2), offs=offsets)
