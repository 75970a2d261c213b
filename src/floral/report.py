"""Tables and plots of finished runs: mean and spread over seeds, metric against rounds."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from floral.checkpoint import atomic_write_bytes, atomic_write_text
from floral.experiment import RunSummary

__all__ = [
    "ComparisonRow",
    "comparison_rows",
    "format_ari",
    "format_cell",
    "plot_curves",
    "pyplot",
    "save_figure",
    "write_comparison",
]


class ComparisonRow(dict):
    """One method: label, n seeds, mean and std of the final metric, seconds, bytes."""


def comparison_rows(runs: Mapping[str, Sequence[RunSummary]]) -> list[ComparisonRow]:
    rows = []
    for label, summaries in runs.items():
        metric = summaries[0].metric
        finals = np.array([s.final[metric] for s in summaries], dtype=float)
        # NaN for methods without a learned router, whose runs report no recovery score.
        ari = np.array([s.final.get("router_ari", np.nan) for s in summaries], dtype=float)
        rows.append(
            ComparisonRow(
                method=label,
                metric=metric,
                seeds=len(summaries),
                mean=float(finals.mean()),
                std=float(finals.std()),  # population std over seeds, as numpy computes it
                ari_mean=float(ari.mean()),
                ari_std=float(ari.std()),
                seconds_per_run=float(np.mean([s.seconds for s in summaries])),
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


def format_ari(mean: float, std: float) -> str:
    """A recovery score cell; a dash for methods without a learned router."""
    return "—" if np.isnan(mean) else f"{mean:.2f} ± {std:.2f}"


def write_comparison(rows: Sequence[ComparisonRow], out: Path, title: str) -> tuple[Path, Path]:
    """`comparison.md` and `comparison.csv` in `out`."""
    metric = rows[0]["metric"]
    header = (
        f"| method | {metric} | router ARI | seeds | s/run | s/round | MB up/round "
        "| MB down/round |"
    )
    lines = [f"# {title}", "", header, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {format_cell(r['mean'], r['std'], metric)} "
            f"| {format_ari(r['ari_mean'], r['ari_std'])} | {r['seeds']} "
            f"| {r['seconds_per_run']:.0f} | {r['seconds_per_round']:.3f} "
            f"| {r['mb_up_per_round']:.3f} | {r['mb_down_per_round']:.3f} |"
        )
    md = out / "comparison.md"
    atomic_write_text(md, "\n".join(lines) + "\n")
    path = out / "comparison.csv"
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())
    return md, path


_AXIS_LABELS = {
    "accuracy": "test accuracy (%)",
    "mse": "test MSE",
    "router_ari": "router ARI (cluster recovery)",
}


def plot_curves(
    runs: Mapping[str, Sequence[RunSummary]], path: Path, title: str, key: str | None = None
) -> Path | None:
    """A column of metrics.csv (default: the headline metric) against rounds per method: mean
    over seeds, band from min to max. Methods whose runs lack the column are left out.

    Returns None when matplotlib is not installed (`pip install 'floral-lora[plot]'`), or when no
    method has the column.
    """
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    column = key or "accuracy"
    drawn = 0
    for label, summaries in runs.items():
        column = key or summaries[0].metric
        if column not in summaries[0].history[0]:
            continue
        rounds = np.array([row["round"] for row in summaries[0].history])
        curves = np.array([[row[column] for row in s.history] for s in summaries])
        (line,) = ax.plot(rounds, curves.mean(axis=0), label=label, linewidth=1.6)
        drawn += 1
        if len(summaries) > 1:
            ax.fill_between(
                rounds, curves.min(axis=0), curves.max(axis=0), color=line.get_color(), alpha=0.15
            )
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("round")
    ax.set_ylabel(_AXIS_LABELS.get(column, column))
    if column == "mse":
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def pyplot():  # noqa: ANN201  (matplotlib is optional: no annotation that imports it)
    """matplotlib.pyplot on the file-only Agg backend, or None when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig: Any, path: Path, tight: bool = True) -> Path:
    """Write `fig` to `path` (aside, then renamed into place) and free it (pyplot keeps every
    open figure alive); `tight=False` keeps the figure's own layout."""
    import matplotlib.pyplot as plt  # only called on figures that pyplot() made

    if tight:
        fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format=path.suffix.lstrip(".") or "png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, image.getvalue())
    return path
