"""Tables and plots of finished runs: mean and spread over seeds, metric against rounds."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from floral.experiment import RunSummary

__all__ = ["ComparisonRow", "comparison_rows", "write_comparison", "plot_curves", "format_cell"]


class ComparisonRow(dict):
    """One method: label, n seeds, mean and std of the final metric, seconds, bytes."""


def comparison_rows(runs: Mapping[str, Sequence[RunSummary]]) -> list[ComparisonRow]:
    rows = []
    for label, summaries in runs.items():
        metric = summaries[0].metric
        finals = np.array([s.final[metric] for s in summaries], dtype=float)
        rows.append(
            ComparisonRow(
                method=label,
                metric=metric,
                seeds=len(summaries),
                mean=float(finals.mean()),
                std=float(finals.std()),  # population std over seeds, as numpy computes it
                seconds_per_round=float(np.mean([s.seconds_per_round for s in summaries])),
                mb_up_per_round=float(np.mean([s.bytes_up / s.rounds for s in summaries])) / 1e6,
                mb_down_per_round=float(np.mean([s.bytes_down / s.rounds for s in summaries]))
                / 1e6,
            )
        )
    return rows


def format_cell(mean: float, std: float, metric: str) -> str:
    if metric == "accuracy":
        return f"{mean:.1f} ± {std:.1f}"
    return f"{mean:.4g} ± {std:.2g}"


def write_comparison(rows: Sequence[ComparisonRow], out: Path, title: str) -> tuple[Path, Path]:
    """`comparison.md` and `comparison.csv` in `out`."""
    metric = rows[0]["metric"]
    header = f"| method | {metric} | seeds | s/round | MB up/round | MB down/round |"
    lines = [f"# {title}", "", header, "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {format_cell(r['mean'], r['std'], metric)} | {r['seeds']} "
            f"| {r['seconds_per_round']:.3f} | {r['mb_up_per_round']:.3f} "
            f"| {r['mb_down_per_round']:.3f} |"
        )
    md = out / "comparison.md"
    md.write_text("\n".join(lines) + "\n")
    path = out / "comparison.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return md, path


def plot_curves(
    runs: Mapping[str, Sequence[RunSummary]], path: Path, title: str
) -> Path | None:
    """Metric against rounds per method: mean over seeds, band from min to max.

    Returns None when matplotlib is not installed (`pip install 'floral[plot]'`).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    metric = "accuracy"
    for label, summaries in runs.items():
        metric = summaries[0].metric
        rounds = np.array([row["round"] for row in summaries[0].history])
        curves = np.array([[row[metric] for row in s.history] for s in summaries])
        mean = curves.mean(axis=0)
        (line,) = ax.plot(rounds, mean, label=label, linewidth=1.6)
        if len(summaries) > 1:
            ax.fill_between(
                rounds, curves.min(axis=0), curves.max(axis=0), color=line.get_color(), alpha=0.15
            )
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)" if metric == "accuracy" else "test MSE")
    if metric == "mse":
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
