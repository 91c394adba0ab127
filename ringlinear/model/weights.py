"""The model's tensors under the names of the published checkpoints.

Module names equal the checkpoint names (`model.word_embeddings.weight`, ...) but for the routed
experts, which are stacked here (`mlp.experts.gate_proj` [E, ...]) and stored one by one on disk
(`mlp.experts.{e}.gate_proj.weight`); some engines call the routing bias `e_score_correction_bias`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..checkpoint import CheckpointError, CheckpointReader

if TYPE_CHECKING:
    from .causal_lm import RingLinearForCausalLM

_STACKED = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)(_scale_inv)?$")  # FP8 scales too
_ALIASES = {"e_score_correction_bias": "expert_bias"}


def _own_state(model: RingLinearForCausalLM) -> dict[str, Tensor]:
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def checkpoint_tensors(model: RingLinearForCausalLM) -> Iterator[tuple[str, Tensor]]:
    """(checkpoint name, tensor) for every persistent tensor, experts split one by one."""
    for name, tensor in _own_state(model).items():
        stacked = _STACKED.match(name)
        if stacked:
            prefix, proj, scale = stacked.groups()
            for e, weight in enumerate(tensor.unbind(0)):
                yield f"{prefix}.{e}.{proj}.weight{scale or ''}", weight
        else:
            yield name, tensor


def _canonical(name: str) -> str:
    head, _, last = name.rpartition(".")
    return f"{head}.{_ALIASES[last]}" if last in _ALIASES else name


def load_weights(model: RingLinearForCausalLM, directory: str | Path) -> None:
    """Copy the checkpoint's tensors into `model`, checking names and shapes first."""
    E = model.config.num_experts
    expected: dict[str, tuple[Tensor, int | None]] = {}  # checkpoint name -> (our tensor, expert index)
    for name, tensor in _own_state(model).items():
        stacked = _STACKED.match(name)
        if stacked:
            prefix, proj, scale = stacked.groups()
            expected.update({f"{prefix}.{e}.{proj}.weight{scale or ''}": (tensor, e) for e in range(E)})
        else:
            expected[name] = (tensor, None)
    with CheckpointReader(directory) as reader:
        present = {_canonical(name): name for name in reader.names()}
        missing = sorted(set(expected) - set(present))
        unexpected = sorted(set(present) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {reader.directory} does not match the model of its config.json: "
                f"{len(missing)} missing weights {_preview(missing)}, {len(unexpected)} unexpected weights "
                f"{_preview(unexpected)}")
        for stored in reader.names():
            target, expert = expected[_canonical(stored)]
            source = reader[stored]
            want = target.shape if expert is None else target.shape[1:]
            if source.shape != want:
                raise CheckpointError(f"{stored} in {reader.files[stored].name} has shape {list(source.shape)}, "
                                      f"the model expects {list(want)}")
            with torch.no_grad():
                (target if expert is None else target[expert]).copy_(source)


def _preview(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}]"
