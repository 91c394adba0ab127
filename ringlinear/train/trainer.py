"""Single-device training loop (CPU or one GPU).

One step: sample the step's windows (a function of seed and step), forward with the LM and MTP loss
under autocast, backward over `grad_accum` micro-batches, clip, AdamW with the learning rate of the
schedule, then the routers' aux-loss-free expert-bias update. Validation in bits per byte every
`eval_interval` steps, metrics to `metrics.jsonl`, checkpoints to `checkpoint/` for resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from ..config import RingLinearConfig
from ..data import prepare_dataset, train_batch, validation_batches
from ..info import describe
from ..model import RingLinearForCausalLM
from .checkpoint import load_checkpoint, save_checkpoint
from .evaluate import autocast, evaluate
from .schedule import WarmupStableDecay


def _setting(default: Any, help: str) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as `train_config.json` in the run folder."""

    out_dir: str = _setting("runs/tiny", "run folder: checkpoint/, metrics.jsonl, train_config.json and "
                            "the tokenized corpus (data/)")
    preset: str = _setting("tiny", "model preset: tiny, mini or flash")
    model_overrides: dict[str, Any] = _setting({}, "model config fields changed from the preset")
    data: list[str] = _setting([], "text files or folders to train on; none = the Python standard "
                               "library's .py files")
    val_fraction: float = _setting(0.02, "fraction of the files held out for validation (by a hash "
                                   "of their path; at least one)")
    steps: int = _setting(300, "optimizer steps")
    batch_size: int = _setting(8, "sequences per optimizer step")
    grad_accum: int = _setting(1, "micro-batches the batch is split into (same result, less memory)")
    seq_len: int = _setting(256, "tokens per sequence")
    lr: float = _setting(3e-3, "peak learning rate")
    min_lr: float = _setting(3e-4, "learning rate at the end of the decay")
    warmup_steps: int = _setting(30, "steps of linear warmup from 0")
    decay_fraction: float = _setting(0.2, "fraction of the steps, at the end, of linear decay to --min-lr")
    weight_decay: float = _setting(0.1, "AdamW weight decay, on matrices only (not norms or biases)")
    beta1: float = _setting(0.9, "AdamW beta1")
    beta2: float = _setting(0.95, "AdamW beta2")
    grad_clip: float = _setting(1.0, "clip the gradient norm to this (0 = off)")
    bias_update_rate: float = _setting(1e-3, "step of the aux-loss-free expert-bias update after each "
                                       "optimizer step")
    eval_interval: int = _setting(50, "validate every this many steps (and at the first and last)")
    eval_batches: int = _setting(4, "validation batches of --batch-size windows, spread evenly over the "
                                 "validation split")
    checkpoint_interval: int = _setting(100, "save a checkpoint every this many steps (and at the end)")
    seed: int = _setting(0, "seed of the initial weights and of the order of training windows")
    device: str = _setting("auto", "cpu, cuda, cuda:N, or auto (cuda when available)")

    def __post_init__(self) -> None:
        rules = [(name, getattr(self, name) > 0, "must be positive")
                 for name in ("steps", "batch_size", "grad_accum", "lr", "eval_interval", "eval_batches",
                              "checkpoint_interval")]
        rules += [(name, getattr(self, name) >= 0, "must be >= 0")
                  for name in ("warmup_steps", "weight_decay", "grad_clip", "bias_update_rate", "seed")]
        rules += [
            ("seq_len", self.seq_len >= 2, "must be at least 2"),
            ("val_fraction", 0 < self.val_fraction < 1, "must be in (0, 1)"),
            ("decay_fraction", 0 <= self.decay_fraction <= 1, "must be in [0, 1]"),
            ("min_lr", 0 <= self.min_lr <= self.lr, f"must be in [0, lr={self.lr}]"),
            ("batch_size", self.batch_size % self.grad_accum == 0, f"must be a multiple of grad_accum={self.grad_accum}"),
        ]
        for name, ok, requirement in rules:
            if not ok:
                raise ValueError(f"invalid {name}={getattr(self, name)!r}: {requirement}")

    def model_config(self) -> RingLinearConfig:
        unknown = sorted(set(self.model_overrides) - {f.name for f in dataclasses.fields(RingLinearConfig)})
        if unknown:
            raise ValueError(f"unknown model config fields in model_overrides: {unknown}")
        return RingLinearConfig.preset(self.preset, **self.model_overrides)



def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
    return device


@dataclass
class TrainResult:
    model: RingLinearForCausalLM
    tokenizer: Tokenizer
    val_bpb: float
    checkpoint_dir: Path


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on the matrices (and stacked expert weights), none on norms."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))


def _check_run_folder(out: Path, config: TrainConfig, resume: bool) -> None:
    saved_path = out / "train_config.json"
    if not resume:
        if (out / "checkpoint").exists():
            raise ValueError(f"{out} already holds a run; add --resume to continue it, or choose another --out-dir")
        return
    if not saved_path.exists():
        raise FileNotFoundError(f"nothing to resume: no {saved_path}")
    saved = json.loads(saved_path.read_text())
    now = dataclasses.asdict(config)
    # The device may change (same math, not bit-identical across devices); the rest defines the run.
    differ = [f"{k}: {saved.get(k)!r} in the run, {now[k]!r} now" for k in now
              if k not in ("device", "out_dir") and saved.get(k) != now[k]]
    if differ:
        raise ValueError(f"--resume needs the settings the run was started with; these differ: {'; '.join(differ)}")


def train(config: TrainConfig, resume: bool = False) -> TrainResult:
    out = Path(config.out_dir)
    _check_run_folder(out, config, resume)
    model_config = config.model_config()
    device = resolve_device(config.device)
    data = prepare_dataset(out / "data", config.data, model_config.vocab_size, config.val_fraction)
    print(data.describe())
    print(describe(model_config))
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")

    torch.manual_seed(config.seed)
    model = RingLinearForCausalLM(model_config).to(device).train()
    optimizer = build_optimizer(model, config)
    schedule = WarmupStableDecay(config.lr, config.warmup_steps, round(config.decay_fraction * config.steps),
                                 config.steps, config.min_lr)
    checkpoint_dir = out / "checkpoint"
    start = load_checkpoint(checkpoint_dir, model, optimizer)["step"] if resume else 0
    val_batches = validation_batches(data.val, config.eval_batches, config.batch_size, config.seq_len)
    bias_rate = config.bias_update_rate if model_config.moe_router_enable_expert_bias else 0.0
    tokens_per_step = config.batch_size * config.seq_len

    with open(out / "metrics.jsonl", "a") as log:
        def record(**metrics: Any) -> None:
            log.write(json.dumps(metrics) + "\n")
            log.flush()

        def validate(step: int) -> float:
            val_loss, val_bpb = evaluate(model, val_batches, data.token_bytes, device)
            record(step=step, val_loss=val_loss, val_bpb=val_bpb)
            tqdm.write(f"step {step}: validation loss {val_loss:.4f} nats/token, {val_bpb:.4f} bits/byte")
            return val_bpb

        progress = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="training",
                        unit="step", dynamic_ncols=True, mininterval=1.0)
        for step in progress:
            if step % config.eval_interval == 0:
                validate(step)
            t0 = time.perf_counter()
            lr = schedule(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = train_batch(data.train, config.seed, step, config.batch_size, config.seq_len).to(device)
            metrics: dict[str, float] = {}  # mean over the micro-batches of each loss the model reports
            for micro in batch.chunk(config.grad_accum):
                with autocast(device):
                    output = model(micro, labels=micro)
                (output.loss / config.grad_accum).backward()
                for name in ("loss", "lm_loss", "mtp_loss"):
                    if getattr(output, name) is not None:
                        metrics[name] = metrics.get(name, 0.0) + getattr(output, name).item() / config.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for router in model.routers():
                router.update_bias(bias_rate)
            tokens_per_s = tokens_per_step / (time.perf_counter() - t0)
            record(step=step + 1, **metrics, lr=lr, grad_norm=grad_norm.item(), tokens_per_s=tokens_per_s)
            progress.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}")
            if (step + 1) % config.checkpoint_interval == 0 or step + 1 == config.steps:
                save_checkpoint(checkpoint_dir, model, data.tokenizer, optimizer,
                                {"step": step + 1, "tokens": (step + 1) * tokens_per_step})
        progress.close()
        val_bpb = validate(config.steps)
    return TrainResult(model.eval(), data.tokenizer, val_bpb, checkpoint_dir)
