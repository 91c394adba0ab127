"""Training checkpoints: the model in the Hugging Face layout (config.json, safetensors,
tokenizer.json — loadable by `from_pretrained` and by the serving engines) plus what resuming needs:
optimizer and RNG state as safetensors, the trainer's progress as JSON. No pickle.

A checkpoint is written to `<dir>.tmp` and then swapped in, so a save killed midway leaves the
previous checkpoint whole (in `<dir>.old` for the instant between the two renames).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import Tensor

from ..checkpoint import load_state
from ..model import RingLinearForCausalLM

OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng_state.safetensors"
STATE_FILE = "trainer_state.json"


def _optimizer_tensors(model: RingLinearForCausalLM, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """'{parameter name}.{state key}' -> tensor, e.g. 'lm_head.weight.exp_avg'."""
    names = {p: n for n, p in model.named_parameters()}
    return {f"{names[p]}.{key}": value for p, state in optimizer.state.items() for key, value in state.items()}


def _load_optimizer_tensors(model: RingLinearForCausalLM, optimizer: torch.optim.Optimizer,
                            tensors: dict[str, Tensor]) -> None:
    by_name: dict[str, dict[str, Tensor]] = {}
    for full_name, value in tensors.items():
        name, _, key = full_name.rpartition(".")
        by_name.setdefault(name, {})[key] = value
    names = {p: n for n, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state_dict = optimizer.state_dict()  # its param_groups number the parameters in this order
    state_dict["state"] = {i: by_name[names[p]] for i, p in enumerate(params) if names[p] in by_name}
    optimizer.load_state_dict(state_dict)  # moves each state to its parameter's device


def _rng_tensors() -> dict[str, Tensor]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return tensors


def save_checkpoint(directory: str | Path, model: RingLinearForCausalLM, tokenizer: Tokenizer,
                    optimizer: torch.optim.Optimizer, state: dict) -> None:
    directory = Path(directory)
    tmp, old = directory.with_name(directory.name + ".tmp"), directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, tokenizer=tokenizer)
    save_file(_optimizer_tensors(model, optimizer), tmp / OPTIMIZER_FILE)
    save_file(_rng_tensors(), tmp / RNG_FILE)
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(directory: str | Path, model: RingLinearForCausalLM,
                    optimizer: torch.optim.Optimizer) -> dict:
    """Restore model (weights and expert bias), optimizer and RNG in place; return the trainer state."""
    directory = Path(directory)
    if not (directory / STATE_FILE).exists():
        raise FileNotFoundError(f"no training checkpoint in {directory} (no {STATE_FILE})")
    load_state(model, directory)
    _load_optimizer_tensors(model, optimizer, load_file(directory / OPTIMIZER_FILE))
    rng = load_file(directory / RNG_FILE)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return json.loads((directory / STATE_FILE).read_text())
