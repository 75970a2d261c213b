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
from floral.train.headline import PERCENT_SCALE, axis_label, metric_label

__all__ = [
    "ComparisonRow",
    "comparison_rows",
    "format_ari",
    "format_cell",
    "headline_of",
    "integer_ticks",
    "plot_curves",
    "pyplot",
    "save_figure",
    "write_comparison",
]


class ComparisonRow(dict):
    """One method: label, n seeds, mean and std of the final headline metrics, seconds, bytes.

    `metric`, `mean` and `std` are the lead metric's (chrF for a generation task); every
    headline metric, the lead included, also has `<metric>_mean` and `<metric>_std`, and
    `headline` lists them in order, separated by spaces."""


def comparison_rows(runs: Mapping[str, Sequence[RunSummary]]) -> list[ComparisonRow]:
    rows = []
    for label, summaries in runs.items():
        metrics = summaries[0].headline
        means, stds = {}, {}
        for metric in metrics:
            finals = np.array([s.final.get(metric, np.nan) for s in summaries], dtype=float)
            means[metric] = float(finals.mean())
            stds[metric] = float(finals.std())  # population std over seeds, as numpy's
        # NaN for methods without a learned router, whose runs report no recovery score.
        ari = np.array([s.final.get("router_ari", np.nan) for s in summaries], dtype=float)
        row = ComparisonRow(
            method=label,
            metric=metrics[0],
            seeds=len(summaries),
            mean=means[metrics[0]],
            std=stds[metrics[0]],
            ari_mean=float(ari.mean()),
            ari_std=float(ari.std()),
            seconds_per_run=float(np.mean([s.seconds for s in summaries])),
            seconds_per_round=float(np.mean([s.seconds_per_round for s in summaries])),
            mb_up_per_round=float(np.mean([s.bytes_up / s.rounds for s in summaries])) / 1e6,
            mb_down_per_round=float(np.mean([s.bytes_down / s.rounds for s in summaries]))
            / 1e6,
            headline=" ".join(metrics),
        )
        for metric in metrics:
            row[f"{metric}_mean"], row[f"{metric}_std"] = means[metric], stds[metric]
        rows.append(row)
    return rows


def headline_of(row: Mapping[str, Any]) -> list[str]:
    """The headline metrics of a comparison row, the lead first."""
    return str(row.get("headline") or row["metric"]).split()


def format_cell(mean: float, std: float, metric: str) -> str:
    """mean ± std: accuracy, chrF and exact match (0-100) to 0.1, others to 4 digits."""
    if np.isnan(mean):
        return "—"
    if metric in PERCENT_SCALE:
        return f"{mean:.1f} ± {std:.1f}"
    return f"{mean:.4g} ± {std:.2g}"


def format_ari(mean: float, std: float) -> str:
    """A recovery score cell; a dash for methods without a learned router."""
    return "—" if np.isnan(mean) else f"{mean:.2f} ± {std:.2f}"


def write_comparison(rows: Sequence[ComparisonRow], out: Path, title: str) -> tuple[Path, Path]:
    """`comparison.md` and `comparison.csv` in `out`: a column per headline metric."""
    metrics = list(dict.fromkeys(m for r in rows for m in headline_of(r)))
    names = " | ".join(metric_label(m) for m in metrics)
    header = (
        f"| method | {names} | router ARI | seeds | s/run | s/round | MB up/round "
        "| MB down/round |"
    )
    lines = [f"# {title}", "", header, "|---" * (len(metrics) + 7) + "|"]
    for r in rows:
        cells = " | ".join(
            format_cell(r.get(f"{m}_mean", np.nan), r.get(f"{m}_std", np.nan), m)
            for m in metrics
        )
        lines.append(
            f"| {r['method']} | {cells} "
            f"| {format_ari(r['ari_mean'], r['ari_std'])} | {r['seeds']} "
            f"| {r['seconds_per_run']:.0f} | {r['seconds_per_round']:.3f} "
            f"| {r['mb_up_per_round']:.3f} | {r['mb_down_per_round']:.3f} |"
        )
    md = out / "comparison.md"
    atomic_write_text(md, "\n".join(lines) + "\n")
    path = out / "comparison.csv"
    text = io.StringIO(newline="")
    fields = list(dict.fromkeys(key for r in rows for key in r))
    writer = csv.DictWriter(text, fieldnames=fields, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())
    return md, path


def plot_curves(
    runs: Mapping[str, Sequence[RunSummary]], path: Path, title: str, key: str | None = None
) -> Path | None:
    """Columns of metrics.csv against rounds per method: mean over seeds, band from min to
    max. `key` None: one panel per headline metric (chrF, exact match, then perplexity for a
    generation task; the task's one metric otherwise). Methods whose runs lack a column are
    left out of its panel.

    Returns None when matplotlib is not installed (`pip install 'floral-lora[plot]'`), or when no
    method has the columns.
    """
    plt = pyplot()
    if plt is None or not runs:
        return None
    first = next(iter(runs.values()))[0]
    columns = [key] if key else list(first.headline)
    columns = [c for c in columns if any(c in s[0].history[0] for s in runs.values())]
    if not columns:
        return None
    fig, axes = plt.subplots(len(columns), 1, figsize=(7, 1.0 + 3.2 * len(columns)),
                             squeeze=False, sharex=True)
    for ax, column in zip(axes[:, 0], columns):
        _draw_curves(ax, runs, column)
        ax.set_ylabel(axis_label(column))
        if column == "mse":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("round")
    integer_ticks(axes[-1, 0])
    axes[0, 0].set_title(title)
    return save_figure(fig, path)


def _draw_curves(ax: Any, runs: Mapping[str, Sequence[RunSummary]], column: str) -> None:
    for label, summaries in runs.items():
        if column not in summaries[0].history[0]:
            continue
        rounds = np.array([row["round"] for row in summaries[0].history])
        curves = np.array([[row.get(column, np.nan) for row in s.history] for s in summaries])
        (line,) = ax.plot(rounds, curves.mean(axis=0), label=label, linewidth=1.6)
        if len(summaries) > 1:
            ax.fill_between(
                rounds, curves.min(axis=0), curves.max(axis=0), color=line.get_color(), alpha=0.15
            )


def integer_ticks(ax: Any) -> None:
    """Ticks of the x axis at whole numbers only (rounds, clusters)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


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
