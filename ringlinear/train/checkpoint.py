"""Training checkpoints: sharded PyTorch DCP state for resuming, plus the model in the Hugging Face
layout for everything else (generate, serve, `ringlinear merge`).

    checkpoints/step_000100/   DCP files of model + optimizer (each process writes its shards),
                               rng_rank{r}.safetensors, trainer_state.json, model/ (HF layout)
    checkpoint                 link to the newest checkpoints/step_*/model

All processes write into `step_000100.tmp/`; the main process writes trainer_state.json last and
then renames the folder. A save killed at any point leaves a `.tmp` folder, which no resume reads
and the next save removes, so the previous checkpoint stays the newest. Only the newest
`keep` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import Tensor
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from ..model import RingLinearForCausalLM
from .parallel import World

STATE_FILE = "trainer_state.json"
MODEL_DIR = "model"
LATEST_LINK = "checkpoint"


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank}.safetensors"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return sorted(p for p in (run_dir / "checkpoints").glob("step_*") if (p / STATE_FILE).exists()
                  and not p.name.endswith(".tmp"))


def export_model(model: RingLinearForCausalLM, directory: Path, tokenizer: Tokenizer, main: bool) -> None:
    """Gather the full weights (all processes take part) and write them in the HF layout (main only)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not main:
        return
    with torch.device("meta"):
        plain = RingLinearForCausalLM(model.config)
    plain = plain.to_empty(device="cpu")
    plain.tie_weights()
    plain.load_state_dict(state)
    plain.save_pretrained(directory, tokenizer=tokenizer)


def save_checkpoint(run_dir: Path, step: int, model: RingLinearForCausalLM, optimizer: torch.optim.Optimizer,
                    state: dict, tokenizer: Tokenizer, world: World, keep: int) -> Path:
    final = run_dir / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if world.is_main:
        for stale in (run_dir / "checkpoints").glob("*.tmp"):
            shutil.rmtree(stale)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)
    save_file(_rng_state(), tmp / _rng_file(world.rank))
    export_model(model, tmp / MODEL_DIR, tokenizer, world.is_main)
    if world.is_main:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        tmp.rename(final)
        link = run_dir / (LATEST_LINK + ".tmp")
        link.unlink(missing_ok=True)
        link.symlink_to(final.relative_to(run_dir) / MODEL_DIR)
        os.replace(link, run_dir / LATEST_LINK)
        for old in checkpoint_dirs(run_dir)[:-keep] if keep else []:
            shutil.rmtree(old)
    dist.barrier()
    return final


def load_checkpoint(directory: Path, model: RingLinearForCausalLM, optimizer: torch.optim.Optimizer,
                    world: World) -> dict:
    """Restore model (weights and routers' expert bias), optimizer and this process's RNG in place;
    return the trainer state."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
    rng = directory / _rng_file(world.rank)
    if rng.exists():  # absent when resuming with more processes than saved
        tensors = load_file(rng)
        torch.set_rng_state(tensors["cpu"])
        if "cuda" in tensors and world.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["cuda"], world.device)
    return json.loads((directory / STATE_FILE).read_text())


def _rng_state() -> dict[str, Tensor]:
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return tensors
