"""Everything that defines a training run; the CLI's `train` flags are made from these fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..config import RingLinearConfig

LR_SCHEDULES = ("wsd", "cosine", "wsm")
PARAM_DTYPES = ("auto", "bfloat16", "float32")
PRECISIONS = ("bf16", "fp8")
RECOMPUTE = ("all", "elementwise")  # what activation checkpointing recomputes (train.parallel)


def setting(default: Any, help: str) -> Any:
    """A run-config field: its default and the help text its command-line flag shows."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def parse_stages(stages: list[str], name: str) -> list[tuple[int, int]]:
    """['600:1024', ...] -> [(600, 1024), ...]: from step 600 on the value is 1024."""
    parsed = []
    for stage in stages:
        step, sep, value = stage.partition(":")
        if not sep or not step.isdigit() or not value.isdigit() or int(value) <= 0:
            raise ValueError(f"invalid {name} stage {stage!r}: expected STEP:VALUE with positive integers")
        parsed.append((int(step), int(value)))
    starts = [step for step, _ in parsed]
    if starts != sorted(set(starts)) or (starts and starts[0] == 0):
        raise ValueError(f"invalid {name}={stages!r}: the steps must increase and start after step 0")
    return parsed


@dataclass
class TrainConfig:
    """Saved as `train_config.json` in the run folder; --resume needs the same values, but for the device
    and a number of steps that keeps the learning rates of the steps taken."""

    out_dir: str = setting("runs/tiny", "run folder: checkpoints/, checkpoint (the latest model), "
                           "metrics.jsonl, tensorboard/, train_config.json and the tokenized corpus (data/)")
    preset: str = setting("tiny", "model preset: tiny, tiny-mla, mini, flash, ring-2.5-1t or ling-2.6-flash")
    model_overrides: dict[str, Any] = setting({}, "model config fields changed from the preset")
    init_from: str = setting("", "start from this checkpoint in the Hugging Face layout (e.g. one made by "
                             "`ringlinear convert`) instead of random weights; its config.json replaces --preset")
    data: list[str] = setting([], "text files or folders to train on; none = the Python standard "
                              "library's .py files")
    tokenized: str = setting("", "a folder written by `ringlinear tokenize` (memory-mapped token files and "
                             "document index) to train on instead of --data")
    val_fraction: float = setting(0.02, "fraction of the files held out for validation (by a hash "
                                  "of their path; at least one); of a single file, the fraction of its text at "
                                  "its end")
    steps: int = setting(300, "optimizer steps")
    batch_size: int = setting(8, "sequences per optimizer step, over all processes")
    batch_stages: list[str] = setting([], "later batch sizes as STEP:SIZE, e.g. 900:32: the batch-size "
                                      "schedule's late switch from small to large batches")
    grad_accum: int = setting(1, "micro-batches each process splits its share of the batch into")
    seq_len: int = setting(256, "tokens per sequence (documents packed end to end, attention kept "
                           "within each document)")
    seq_len_stages: list[str] = setting([], "later context lengths as STEP:LENGTH, e.g. 600:1024 "
                                        "(context extension in one run)")
    lr: float = setting(3e-3, "peak learning rate")
    lr_schedule: str = setting("wsd", "wsd (warmup, stable, linear decay), cosine, or wsm (warmup, then "
                               "constant: decay emulated afterwards by `ringlinear merge`)")
    min_lr: float = setting(3e-4, "learning rate at the end of the decay (wsd, cosine)")
    warmup_steps: int = setting(30, "steps of linear warmup from 0")
    decay_fraction: float = setting(0.2, "wsd: fraction of the steps, at the end, of linear decay to --min-lr")
    weight_decay: float = setting(0.1, "AdamW weight decay, on matrices only (not norms or biases)")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    grad_clip: float = setting(1.0, "clip the gradient norm to this (0 = off)")
    bias_update_rate: float = setting(1e-3, "step of the aux-loss-free expert-bias update after each "
                                      "optimizer step")
    eval_interval: int = setting(50, "validate every this many steps (and at the first and last)")
    eval_batches: int = setting(4, "validation batches of --batch-size sequences of the first --seq-len, "
                                "spread evenly over the validation split")
    checkpoint_interval: int = setting(100, "save a checkpoint every this many steps (and at the end)")
    keep_checkpoints: int = setting(4, "keep the newest this many checkpoints (0 = all; WSM merges need "
                                    "as many as it averages)")
    activation_checkpointing: int = setting(0, "recompute the activations of every N-th layer in the "
                                            "backward instead of keeping them (1 = all layers, 0 = none)")
    recompute: str = setting("all", "what a checkpointed layer recomputes: all of its forward, or elementwise "
                             "(keep the GEMM and attention outputs, recompute norms, activations and casts)")
    param_dtype: str = setting("auto", "dtype the layers compute in (fp32 master weights and optimizer "
                               "state either way): bfloat16, float32, or auto = bfloat16 on GPUs, float32 on CPUs")
    precision: str = setting("bf16", "GEMMs of the linear layers and routed experts: bf16 (in --param-dtype) or "
                             "fp8 (blockwise e4m3 as DeepSeek-V3: 1x128 activation and 128x128 weight scales, "
                             "forward and backward; router, embeddings and LM head unchanged)")
    max_skipped_steps: int = setting(5, "stop after this many steps in a row with a non-finite loss or "
                                     "gradient norm (each is skipped)")
    spike_sigmas: float = setting(4.0, "log a loss spike when the loss exceeds the mean of the last 50 "
                                  "steps by this many standard deviations")
    tensorboard: bool = setting(True, "also write the metrics for TensorBoard (tensorboard/ in the run folder)")
    peak_tflops: float = setting(0.0, "the device's dense bf16 peak for MFU, in TFLOP/s per process; "
                                 "0 = known GPUs' (H100/H200: 989), no MFU on a CPU")
    seed: int = setting(0, "seed of the initial weights and of the order of training documents")
    device: str = setting("auto", "cpu, cuda, or auto (cuda when available; each process uses the GPU "
                          "of its LOCAL_RANK)")

    def __post_init__(self) -> None:
        rules = [(name, getattr(self, name) > 0, "must be positive")
                 for name in ("steps", "batch_size", "grad_accum", "lr", "eval_interval", "eval_batches",
                              "checkpoint_interval", "max_skipped_steps", "spike_sigmas")]
        rules += [(name, getattr(self, name) >= 0, "must be >= 0")
                  for name in ("warmup_steps", "weight_decay", "grad_clip", "bias_update_rate", "seed",
                               "keep_checkpoints", "activation_checkpointing", "peak_tflops")]
        rules += [
            ("seq_len", self.seq_len >= 2, "must be at least 2"),
            ("val_fraction", 0 < self.val_fraction < 1, "must be in (0, 1)"),
            ("decay_fraction", 0 <= self.decay_fraction <= 1, "must be in [0, 1]"),
            ("min_lr", 0 <= self.min_lr <= self.lr, f"must be in [0, lr={self.lr}]"),
            ("lr_schedule", self.lr_schedule in LR_SCHEDULES, f"must be one of {LR_SCHEDULES}"),
            ("param_dtype", self.param_dtype in PARAM_DTYPES, f"must be one of {PARAM_DTYPES}"),
            ("precision", self.precision in PRECISIONS, f"must be one of {PRECISIONS}"),
            ("recompute", self.recompute in RECOMPUTE, f"must be one of {RECOMPUTE}"),
            ("tokenized", not (self.tokenized and self.data), "give --data or --tokenized, not both"),
        ]
        for name, ok, requirement in rules:
            if not ok:
                raise ValueError(f"invalid {name}={getattr(self, name)!r}: {requirement}")
        for name in ("batch_stages", "seq_len_stages"):
            for step, _ in parse_stages(getattr(self, name), name):
                if step >= self.steps:
                    raise ValueError(f"invalid {name}: a stage starts at step {step}, after the last step "
                                     f"({self.steps - 1})")

    def model_config(self) -> RingLinearConfig:
        unknown = sorted(set(self.model_overrides) - {f.name for f in dataclasses.fields(RingLinearConfig)})
        if unknown:
            raise ValueError(f"unknown model config fields in model_overrides: {unknown}")
        if self.init_from:
            return RingLinearConfig.from_pretrained(self.init_from).replace(**self.model_overrides)
        return RingLinearConfig.preset(self.preset, **self.model_overrides)
