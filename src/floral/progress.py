"""Progress bars and result tables for the terminal (rich)."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any, cast

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from floral.report import ComparisonRow, format_ari, format_cell

__all__ = ["RunProgress", "GridProgress", "print_summary", "print_comparison"]

_console = Console(stderr=True)


def _bar(disable: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[latest]}"),
        console=_console,
        disable=disable,
    )


def _latest(latest: dict[str, float]) -> str:
    if "accuracy" in latest:
        return f"acc {latest['accuracy']:.1f}%"
    if "mse" in latest:
        return f"mse {latest['mse']:.4g}"
    return ""


class RunProgress:
    """One bar for one run, showing the latest evaluated metric."""

    def __init__(self, config: Any, disable: bool = False) -> None:
        self.total = config.train.rounds
        self.label = f"{config.name} · {config.method_name}"
        self.progress = _bar(disable)

    def __enter__(self) -> RunProgress:
        self.progress.start()
        self.task = self.progress.add_task(self.label, total=self.total, latest="")
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, result: Any, latest: dict[str, float]) -> None:
        self.progress.update(self.task, completed=result.round, latest=_latest(latest))


class GridProgress:
    """One bar per run and one for the whole grid, in rounds."""

    def __init__(self, runs: Sequence[Any], disable: bool = False) -> None:
        self.runs = runs
        self.progress = _bar(disable)
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> GridProgress:
        self.progress.start()
        total = sum(r.config.train.rounds for r in self.runs)
        self.overall = self.progress.add_task("all runs", total=total, latest="")
        for run in self.runs:
            self.tasks[run.key] = self.progress.add_task(
                run.key, total=run.config.train.rounds, latest="", visible=False
            )
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, key: str, done: int, total: int, latest: dict[str, float]) -> None:
        task = self.tasks[key]
        self.progress.update(
            task, completed=done, latest=_latest(latest), visible=done < total
        )
        runs = [t for t in self.progress.tasks if t.id != self.overall]
        finished = sum(t.completed >= cast(float, t.total) for t in runs)  # all have totals
        self.progress.update(
            self.overall,
            completed=sum(t.completed for t in runs),
            latest=f"{finished}/{len(runs)} runs done",
        )


def print_summary(summary: Any) -> None:
    console = Console()
    final = summary.final
    metric = summary.metric
    value = f"{final[metric]:.2f}%" if metric == "accuracy" else f"{final[metric]:.5g}"
    if "clients_evaluated" in final:  # what the metric covers
        value += f" over {int(final['clients_evaluated'])} clients"
    if "dp_epsilon" in final:  # the privacy spent belongs beside what it bought
        value += f" at ε = {final['dp_epsilon']:.3g}, δ = {final.get('dp_delta', math.nan):g}"
    console.print(
        f"[bold]{summary.name}[/] · {summary.method} · seed {summary.seed}: "
        f"{metric} {value} after {summary.rounds} rounds "
        f"({summary.seconds_per_round:.3f} s/round, "
        f"{(summary.bytes_up + summary.bytes_down) / 1e6:.1f} MB sent) → {summary.out_dir}"
    )


def print_comparison(rows: Sequence[ComparisonRow], title: str) -> None:
    table = Table(title=title)
    metric = rows[0]["metric"]
    columns = ("method", f"{metric} (mean ± std)", "router ARI", "seeds", "s/round", "MB up/round")
    for column in columns:
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=True)
    for r in rows:
        table.add_row(
            r["method"],
            format_cell(r["mean"], r["std"], metric),
            format_ari(r["ari_mean"], r["ari_std"]),
            str(r["seeds"]),
            f"{r['seconds_per_round']:.3f}",
            f"{r['mb_up_per_round']:.3f}",
        )
    # Off a terminal (a log, a pipe) rich would squeeze the table into 80 columns.
    Console(width=None if sys.stdout.isatty() else 120).print(table)
