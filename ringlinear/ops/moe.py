"""Expert computation over token rows grouped by expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def grouped_swiglu(x: Tensor, gate: Tensor, up: Tensor, down: Tensor, counts: Tensor) -> Tensor:
    """SwiGLU of each expert over its rows: x [M, hidden] sorted by expert, `counts[e]` rows for
    expert e; gate/up [E, inter, hidden], down [E, hidden, inter]. Returns [M, hidden]."""
    outputs = []
    for e, rows in enumerate(x.split(counts.tolist())):
        if rows.shape[0]:
            outputs.append(F.linear(F.silu(F.linear(rows, gate[e])) * F.linear(rows, up[e]), down[e]))
    return torch.cat(outputs) if outputs else x.new_zeros(0, down.shape[1])
