"""Loss curves of one or more runs from their metrics.jsonl, as a PNG (matplotlib)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


def read_curve(run_dir: Path, metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `metric`; where a resumed run logged a step twice, the later value."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    points = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {number} is not JSON: {e}") from None
        if isinstance(record.get(metric), (int, float)):
            points[record["step"]] = record[metric]
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def plot_runs(runs: Sequence[str | Path], output: str | Path, metrics: Sequence[str] = ("loss", "val_bpb")) -> None:
    """One panel per metric, one line per run."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        curves = {Path(run).name or str(run): read_curve(Path(run), metric) for run in runs}
        if not any(steps for steps, _ in curves.values()):
            raise ValueError(f"no run logged {metric!r}")
        for name, (steps, values) in curves.items():
            ax.plot(steps, values, label=name, marker="o" if len(steps) < 20 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)
