"""Expert computation over token rows grouped by expert.

Two forms with one signature: the reference loops over experts (it reads the row counts on the
host); the grouped form runs each projection as one `torch._grouped_mm` over all experts with the
group offsets on the device, so it never synchronises and can be captured in a CUDA graph. CUDA
bfloat16 takes the grouped form; everything else takes the loop. Under `batch_invariant()`, CUDA
(fp16, bf16, fp32) takes a third form, the grouped products of `invariant_kernels` (likewise without
a sync), and the rest the loop, which the mode turns into products of one fixed shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import batch_invariant
from .fused import swiglu


def grouped_swiglu(x: Tensor, gate: Tensor, up: Tensor, down: Tensor, counts: Tensor, scales: Tensor) -> Tensor:
    """SwiGLU of each expert over its rows, each row scaled by its routing weight: x [M, hidden]
    sorted by expert, `counts[e]` rows for expert e; gate/up [E, inter, hidden], down [E, hidden,
    inter]; scales [M] fp32. Returns [M, hidden]. The scale multiplies the intermediate (inter wide,
    a quarter of hidden at Ring-mini's shapes) in fp32, so no fp32 copy of the output is made."""
    if batch_invariant.enabled() and batch_invariant.on_kernels(x, gate, up, down):
        return grouped_swiglu_invariant(x, gate, up, down, counts, scales)
    if x.is_cuda and x.dtype == torch.bfloat16 and not batch_invariant.enabled():
        return grouped_swiglu_grouped_mm(x, gate, up, down, counts, scales)
    return grouped_swiglu_loop(x, gate, up, down, counts, scales)


def grouped_swiglu_loop(x: Tensor, gate: Tensor, up: Tensor, down: Tensor, counts: Tensor,
                        scales: Tensor) -> Tensor:
    outputs = []
    sizes = counts.tolist()
    # unbind, not gate[e]: indexing's backward would fill a zero gradient of all E experts per expert
    for rows, s, g, u, d in zip(x.split(sizes), scales.split(sizes), gate.unbind(), up.unbind(), down.unbind()):
        if rows.shape[0]:
            outputs.append(F.linear(swiglu(F.linear(rows, g), F.linear(rows, u), s), d))
    return torch.cat(outputs) if outputs else x.new_zeros(0, down.shape[1])


def grouped_swiglu_grouped_mm(x: Tensor, gate: Tensor, up: Tensor, down: Tensor, counts: Tensor,
                              scales: Tensor) -> Tensor:
    offsets = counts.cumsum(0).to(torch.int32)  # end row of each expert's group
    h = swiglu(torch._grouped_mm(x, gate.transpose(1, 2), offs=offsets),
               torch._grouped_mm(x, up.transpose(1, 2), offs=offsets), scales)
    return torch._grouped_mm(h, down.transpose(1, 2), offs=offsets)


def grouped_swiglu_invariant(x: Tensor, gate: Tensor, up: Tensor, down: Tensor, counts: Tensor,
                             scales: Tensor) -> Tensor:
    from .invariant_kernels import invariant_grouped_mm
    h = swiglu(invariant_grouped_mm(x, gate, counts), invariant_grouped_mm(x, up, counts), scales)
    return invariant_grouped_mm(h, down, counts)
