"""Warmup-Stable-Merge: emulate a learning-rate decay by averaging constant-LR checkpoints.

With checkpoints θ_0 … θ_k taken at equal intervals and updates g between them,
Σ_j c_j θ_j = θ_0 − Σ_i w_i g_i where w_i = Σ_{j≥i} c_j. To apply a decay shape f (f(0) = 1,
non-increasing) to the last k intervals choose w_i = f(i / (k+1)), i.e.

    c_k = w_k,   c_j = w_j − w_{j+1} (1 ≤ j < k),   c_0 = 1 − w_1.

Linear decay gives the uniform mean of the k+1 checkpoints.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

from ..checkpoint import CheckpointError, CheckpointReader, save_tensors

DECAYS: dict[str, Callable[[float], float]] = {
    "linear": lambda x: 1.0 - x,
    "cosine": lambda x: 0.5 * (1.0 + math.cos(math.pi * x)),
    "1-sqrt": lambda x: 1.0 - math.sqrt(x),
}


def merge_coefficients(num_checkpoints: int, decay: str) -> list[float]:
    """c_0 … c_k for k + 1 = `num_checkpoints` checkpoints, oldest first; they sum to 1."""
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {sorted(DECAYS)}, got {decay!r}")
    if num_checkpoints < 1:
        raise ValueError("need at least one checkpoint to merge")
    k = num_checkpoints - 1
    w = [DECAYS[decay](i / (k + 1)) for i in range(1, k + 1)]
    if k == 0:
        return [1.0]
    return [1.0 - w[0]] + [w[j] - w[j + 1] for j in range(k - 1)] + [w[-1]]


def merge_checkpoints(checkpoints: Sequence[str | Path], output: str | Path, decay: str = "linear") -> list[float]:
    """Write the merged checkpoint (fp64 accumulation, stored in the inputs' dtype) with the config
    and tokenizer of the newest one, one tensor at a time. Returns the coefficients, oldest first."""
    coefficients = merge_coefficients(len(checkpoints), decay)
    with ExitStack() as stack:
        readers = [stack.enter_context(CheckpointReader(d)) for d in checkpoints]
        names = readers[0].names()
        for reader in readers[1:]:
            if set(reader.names()) != set(names):
                differ = sorted(set(reader.names()) ^ set(names))
                raise CheckpointError(f"{reader.directory} does not hold the same tensors as "
                                      f"{readers[0].directory}: {differ[:5]}")

        def merged():
            for name in names:
                tensors = [reader[name] for reader in readers]
                for reader, tensor in zip(readers, tensors):
                    if tensor.shape != tensors[0].shape:
                        raise CheckpointError(f"{name} has shape {list(tensor.shape)} in {reader.directory} "
                                              f"but {list(tensors[0].shape)} in {readers[0].directory}")
                total = sum(c * t.double() for c, t in zip(coefficients, tensors))
                yield name, total.to(tensors[-1].dtype)

        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        save_tensors(merged(), output)
    newest = Path(checkpoints[-1])
    for extra in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (newest / extra).exists():
            shutil.copy(newest / extra, output / extra)
    return coefficients
