"""The hybrid-ratio scaling sweep (the report's Figure 3): small models of one base config trained
on one corpus for a grid of layer group sizes G (M = G - 1 linear layers per softmax layer) and
compute budgets (width and steps), each an ordinary training run in its own folder, then
loss = E + A·C^(-α) fitted per G over the training FLOPs C."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import read_json
from ..data import prepare_dataset
from ..train import TrainConfig, train
from ..train.plot import read_curve
from .plot import Line, save_plot

LAYER_GROUP_SIZES = (1, 2, 4, 8)  # M = 0 (all softmax), 1, 3, 7


@dataclass(frozen=True)
class Budget:
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    steps: int


@dataclass(frozen=True)
class Grid:
    """The budgets and what every run of the sweep shares (the tiny preset's other fields)."""

    budgets: tuple[Budget, ...]
    batch_size: int
    seq_len: int
    vocab_size: int
    num_hidden_layers: int = 8  # one group of 8 for G = 8, LLLS LLLS for G = 4, ...
    checkpoints: int = 4  # per run, the last at its end: where a stopped run resumes


# 12 runs of 50-200 steps on 128-token rows: a 2-core CPU in about 15 minutes.
QUICK = Grid((Budget(64, 2, 1, 50), Budget(96, 3, 1, 100), Budget(128, 4, 2, 200)),
             batch_size=8, seq_len=128, vocab_size=1024)
# 16 runs of 1-33 M tokens: a GPU's work, hours on a CPU.
FULL = Grid((Budget(128, 4, 2, 500), Budget(192, 6, 2, 1000), Budget(256, 8, 2, 2000), Budget(384, 12, 4, 4000)),
            batch_size=16, seq_len=512, vocab_size=4096)


def run_config(out_dir: Path, grid: Grid, budget: Budget, layer_group_size: int, tokenized: Path, device: str,
               seed: int) -> TrainConfig:
    w = budget.hidden_size
    overrides = {"vocab_size": grid.vocab_size, "num_hidden_layers": grid.num_hidden_layers, "hidden_size": w,
                 "num_attention_heads": budget.num_attention_heads,
                 "num_key_value_heads": budget.num_key_value_heads, "head_dim": w // budget.num_attention_heads,
                 "intermediate_size": 3 * w, "moe_intermediate_size": w // 2,
                 "moe_shared_expert_intermediate_size": w // 2, "layer_group_size": layer_group_size}
    return TrainConfig(out_dir=str(out_dir / f"G{layer_group_size}_w{w}_s{budget.steps}"), preset="tiny",
                       model_overrides=overrides, tokenized=str(tokenized), steps=budget.steps,
                       batch_size=grid.batch_size, seq_len=grid.seq_len, warmup_steps=max(1, budget.steps // 10),
                       eval_interval=budget.steps, eval_batches=8, checkpoint_interval=max(1, budget.steps // grid.checkpoints),
                       keep_checkpoints=1, tensorboard=False, device=device, seed=seed)


def finished(config: TrainConfig) -> dict | None:
    """The final validation bits per byte and training FLOPs of the run in `config.out_dir` if it ran
    all its steps; None if it has not (yet)."""
    out = Path(config.out_dir)
    if not (out / "train_config.json").exists():
        return None
    saved, now = read_json(out / "train_config.json"), dataclasses.asdict(config)
    if {k: v for k, v in saved.items() if k != "device"} != {k: v for k, v in now.items() if k != "device"}:
        raise ValueError(f"{out} holds a run with other settings than this sweep's; remove it or choose another "
                         "--out-dir")
    if not (out / "metrics.jsonl").exists():
        return None
    val_steps, val_bpb = read_curve(out, "val_bpb")
    flop_steps, flops = read_curve(out, "flops")
    if not val_steps or val_steps[-1] != config.steps or len(flop_steps) != config.steps:
        return None
    return {"val_bpb": val_bpb[-1], "flops": sum(flops)}


def run_sweep(out_dir: str | Path, grid: Grid, layer_group_sizes: list[int], data: list[str], device: str,
              seed: int) -> list[dict]:
    """Train every run not yet finished (resuming one that stopped) and return all the runs' results."""
    if not layer_group_sizes or any(g < 1 or g > grid.num_hidden_layers for g in layer_group_sizes):
        raise ValueError(f"invalid --layer-group-sizes {layer_group_sizes}: each must be in "
                         f"[1, {grid.num_hidden_layers}] (the sweep's models have {grid.num_hidden_layers} layers)")
    out = Path(out_dir)
    tokenized = out / "data"
    prepare_dataset(tokenized, data, grid.vocab_size, TrainConfig.val_fraction)  # once, reused by every run
    runs, configs = [], [(g, b) for g in layer_group_sizes for b in grid.budgets]
    for i, (g, budget) in enumerate(configs, start=1):
        config = run_config(out, grid, budget, g, tokenized, device, seed)
        result = finished(config)
        if result is None:
            print(f"sweep run {i}/{len(configs)}: {config.out_dir}", flush=True)
            train(config, resume=Path(config.out_dir, "train_config.json").exists())
            result = finished(config)
        else:
            print(f"sweep run {i}/{len(configs)}: {config.out_dir} already finished", flush=True)
        runs.append({"layer_group_size": g, "linear_per_softmax": g - 1, "hidden_size": budget.hidden_size,
                     "steps": budget.steps, "run_dir": config.out_dir, **result})
    return runs


@dataclass(frozen=True)
class PowerLaw:
    E: float
    A: float
    alpha: float

    def __call__(self, flops: np.ndarray | float) -> np.ndarray | float:
        return self.E + self.A * np.asarray(flops, dtype=np.float64) ** -self.alpha


def fit_power_law(flops: list[float], losses: list[float]) -> PowerLaw:
    """Least squares in the loss of E + A·C^(-α), E in [0, min loss): for each E, log(L - E) is a line
    in log C (A and α by linear least squares); E on a grid, then a finer grid around the best."""
    C, L = np.asarray(flops, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    if len(C) < 3 or len(set(C.tolist())) < 3:
        raise ValueError(f"fitting E + A·C^(-α) needs 3 or more different budgets, got {len(set(C.tolist()))}")
    x = np.log(C)

    def fit(E: float) -> tuple[float, PowerLaw]:
        slope, intercept = np.polyfit(x, np.log(L - E), 1)
        law = PowerLaw(float(E), float(np.exp(intercept)), float(-slope))
        return float(np.sum((law(C) - L) ** 2)), law

    grid = np.linspace(0.0, L.min(), 201)[:-1]
    for _ in range(4):  # each round: the best of 200 points, then 200 across the two cells around it
        best = min(grid, key=lambda E: fit(E)[0])
        step = grid[1] - grid[0]
        grid = np.linspace(max(0.0, best - step), min(best + step, L.min()), 201)
        grid = grid[grid < L.min()]
    return fit(best)[1]


def analyse(runs: list[dict]) -> dict:
    """Per layer group size its fit, and the training compute (within the measured range) from which
    its fitted loss is below the all-softmax (G = 1) fit's."""
    groups = sorted({r["layer_group_size"] for r in runs})
    fits = {g: fit_power_law([r["flops"] for r in runs if r["layer_group_size"] == g],
                             [r["val_bpb"] for r in runs if r["layer_group_size"] == g]) for g in groups}
    flops = [r["flops"] for r in runs]
    grid = np.geomspace(min(flops), max(flops), 400)
    below = {}
    if 1 in fits:
        for g in groups:
            if g != 1:
                under = np.nonzero(fits[g](grid) < fits[1](grid))[0]
                below[g] = float(grid[under[0]]) if len(under) else None
    return {"runs": runs, "fits": {g: dataclasses.asdict(f) for g, f in fits.items()}, "below_softmax_from": below}


def table(result: dict) -> str:
    lines = [f"{'G':>2} {'M':>2} {'width':>5} {'steps':>5} {'FLOPs':>9} {'val bpb':>8}"]
    for r in result["runs"]:
        lines.append(f"{r['layer_group_size']:>2} {r['linear_per_softmax']:>2} {r['hidden_size']:>5} "
                     f"{r['steps']:>5} {r['flops']:>9.3g} {r['val_bpb']:>8.4f}")
    lines.append("fits: bits per byte = E + A·C^(-α), C = training FLOPs")
    for g, f in result["fits"].items():
        below = result["below_softmax_from"].get(g)
        where = "" if g == 1 else ("; never below the all-softmax fit in the measured range" if below is None
                                   else f"; below the all-softmax fit from C = {below:.3g}")
        lines.append(f"  M = {g - 1} (G = {g}): E = {f['E']:.3f}, A = {f['A']:.4g}, α = {f['alpha']:.3f}{where}")
    return "\n".join(lines)


def plot(result: dict, path: str | Path) -> None:
    lines = []
    for i, (g, f) in enumerate(result["fits"].items()):
        runs = [r for r in result["runs"] if r["layer_group_size"] == g]
        C = np.geomspace(min(r["flops"] for r in runs), max(r["flops"] for r in runs), 100)
        color = f"C{i}"
        lines.append(Line(f"M = {g - 1}" + (" (softmax)" if g == 1 else ""), [r["flops"] for r in runs],
                          [r["val_bpb"] for r in runs], "o", color))
        lines.append(Line(None, C, PowerLaw(**f)(C), "-", color))
    save_plot(path, lines, "training FLOPs", "validation bits per byte", "loss against compute by hybrid ratio",
              log_y=False)
