"""The analyses' figures: lines and points against a logarithmic x axis, as a PNG (matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Line:
    label: str | None  # None: not in the legend
    x: Sequence[float]
    y: Sequence[float]
    style: str = "-"  # matplotlib format: "-", "--", "o", ...
    color: str | None = None


def save_plot(path: str | Path, lines: Sequence[Line], xlabel: str, ylabel: str, title: str,
              log_y: bool = True) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for line in lines:
        ax.plot(line.x, line.y, line.style, label=line.label, color=line.color)
    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
