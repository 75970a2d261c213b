"""Progress and result tables for the terminal (rich), and plain progress lines elsewhere.

On a terminal a run shows a live bar. Off one (a log file, nohup, CI), where a bar would only
be drawn when it ends, a run prints a plain line every `PLAIN_EVERY` seconds instead (the
environment variable FLORAL_PROGRESS_EVERY changes it): the round, the clients done in it,
the time elapsed and an estimate of the time left.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
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

from floral.report import ComparisonRow, format_ari, format_cell, headline_of
from floral.train.headline import format_metric, headline_metrics, metric_label

__all__ = ["PLAIN_EVERY", "RunProgress", "GridProgress", "print_summary", "print_comparison"]

_console = Console(stderr=True)
PLAIN_EVERY = 30.0  # seconds between plain progress lines off a terminal


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
    if "chrf" in latest:
        return f"chrF {latest['chrf']:.1f}"
    if "accuracy" in latest:
        return f"acc {latest['accuracy']:.1f}%"
    if "mse" in latest:
        return f"mse {latest['mse']:.4g}"
    if "perplexity" in latest:
        return f"ppl {latest['perplexity']:.4g}"
    return ""


def _plain_every() -> float:
    text = os.environ.get("FLORAL_PROGRESS_EVERY", "")
    try:
        return float(text) if text else PLAIN_EVERY
    except ValueError:
        return PLAIN_EVERY


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Ticker:
    """Calls `line()` every `every` seconds on a thread of its own and prints what it returns
    to stderr, until stopped."""

    def __init__(self, line: Callable[[], str], every: float) -> None:
        self.line, self.every = line, every
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="floral-progress")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join()

    def _run(self) -> None:
        while not self.stop_event.wait(self.every):
            print(self.line(), file=sys.stderr, flush=True)


class RunProgress:
    """One run's progress: a bar showing the latest evaluated metric on a terminal, plain
    lines at a fixed interval elsewhere (`plain`: None = decide by whether stderr is a
    terminal). `on_client` is the callback for each client done, where plain lines show it.
    `resumed`: the run continues a checkpoint, whose round is known at the first round done
    here.

    The time left is estimated from the pace of training in this process: from the end of
    the evaluation of round 0 (or, resumed, from the first round done here), so neither
    loading the data and the model nor that first evaluation inflates it."""

    def __init__(
        self, config: Any, disable: bool = False, plain: bool | None = None,
        every: float | None = None, resumed: bool = False,
    ) -> None:
        self.total = config.train.rounds
        self.label = f"{config.name} · {config.method_name}"
        self.disable = disable
        self.plain = (not _console.is_terminal) if plain is None else plain
        self.every = _plain_every() if every is None else every
        self.progress = _bar(disable or self.plain)
        self.lock = threading.Lock()
        self.done: int | None = None if resumed else 0  # rounds finished (None: not known)
        self.stage, self.clients, self.of = "", 0, 0  # the clients done in the running round
        self.trained = False  # a client of the running round has trained
        self.latest = ""
        self.began = time.monotonic()
        # (time, rounds done then): where the pace of training is measured from.
        self.reference: tuple[float, float] | None = None if resumed else (self.began, 0.0)
        self.ticker: _Ticker | None = None

    @property
    def on_client(self) -> Callable[[str, int, int], None] | None:
        return self.client if self.plain and not self.disable else None

    def __enter__(self) -> RunProgress:
        self.began = time.monotonic()
        if self.reference is not None:
            self.reference = (self.began, 0.0)
        if self.plain:
            if not self.disable:
                self.ticker = _Ticker(self.line, self.every)
                self.ticker.start()
            return self
        self.progress.start()
        self.task = self.progress.add_task(self.label, total=self.total, latest="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.ticker is not None:
            self.ticker.stop()
        if not self.plain:
            self.progress.stop()

    def update(self, result: Any, latest: dict[str, float]) -> None:
        with self.lock:
            if self.reference is None:  # resumed: the pace is measured from here
                self.reference = (time.monotonic(), float(result.round))
            self.done, self.stage, self.clients, self.of = result.round, "", 0, 0
            self.trained = False
            self.latest = _latest(latest)
        if not self.plain:
            self.progress.update(self.task, completed=result.round, latest=self.latest)

    def client(self, stage: str, done: int, of: int) -> None:
        """A client finished its training (stage "train") or evaluation ("evaluate")."""
        with self.lock:
            self.stage, self.clients, self.of = stage, done, of
            self.trained = self.trained or stage == "train"
            if stage == "evaluate" and self.done == 0 and not self.trained:
                self.reference = (time.monotonic(), 0.0)  # round 0's evaluation: not training

    def line(self) -> str:
        """The plain progress line: round, clients done, time elapsed and left."""
        now = time.monotonic()
        with self.lock:
            done, stage, clients, of = self.done, self.stage, self.clients, self.of
            latest, trained, reference = self.latest, self.trained, self.reference
        elapsed = f"{_clock(now - self.began)} elapsed"
        verb = "trained" if stage == "train" else "evaluated"
        if done is None:  # resumed, before its first round here ends
            where = "resumed" + (f", {clients}/{of} clients {verb}" if of else "")
            return f"{self.label}: {where}, {elapsed}, ETA —"
        if not (done or of):
            return f"{self.label}: setting up (data, model), {elapsed}"
        if done >= self.total:
            where = f"all {self.total} rounds done"
        elif stage == "evaluate" and not trained and done == 0:
            where = f"round 0 of {self.total} (the model before training)"
        else:
            where = f"round {done + 1} of {self.total}"
        if of and done < self.total:
            where += f", {clients}/{of} clients {verb}"
        position = float(done)
        if trained and stage == "evaluate":
            position += 1.0  # trained; evaluated now
        elif stage == "train" and of:
            position += clients / of
        eta = "—"
        if reference is not None and position > reference[1]:
            pace = (now - reference[0]) / (position - reference[1])
            eta = _clock(pace * (self.total - position))
        text = f"{self.label}: {where}, {elapsed}, ETA {eta}"
        return f"{text}; {latest}" if latest else text


class GridProgress:
    """One bar per run and one for the whole grid, in rounds, on a terminal; elsewhere a plain
    line at a fixed interval (rounds and runs done, time elapsed and left)."""

    def __init__(
        self, runs: Sequence[Any], disable: bool = False, plain: bool | None = None,
        every: float | None = None,
    ) -> None:
        self.runs = runs
        self.plain = (not _console.is_terminal) if plain is None else plain
        self.disable = disable
        self.every = _plain_every() if every is None else every
        self.progress = _bar(disable or self.plain)
        self.tasks: dict[str, TaskID] = {}
        self.done: dict[str, tuple[int, int]] = {}  # run key -> (rounds done, its rounds)
        self.first: dict[str, int] = {}  # run key -> rounds done when first heard of here
        self.total = sum(r.config.train.rounds for r in runs)
        self.lock = threading.Lock()
        self.began = time.monotonic()
        self.ticker: _Ticker | None = None

    def __enter__(self) -> GridProgress:
        self.began = time.monotonic()
        if self.plain:
            if not self.disable:
                self.ticker = _Ticker(self.line, self.every)
                self.ticker.start()
            return self
        self.progress.start()
        self.overall = self.progress.add_task("all runs", total=self.total, latest="")
        for run in self.runs:
            self.tasks[run.key] = self.progress.add_task(
                run.key, total=run.config.train.rounds, latest="", visible=False
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.ticker is not None:
            self.ticker.stop()
        if not self.plain:
            self.progress.stop()

    def update(self, key: str, done: int, total: int, latest: dict[str, float]) -> None:
        with self.lock:
            # A run skipped as finished, or resumed, starts where it is: no time spent here.
            self.first.setdefault(key, done if done >= total else max(done - 1, 0))
            self.done[key] = (done, total)
        if self.plain:
            return
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

    def line(self) -> str:
        """The plain progress line of the grid."""
        with self.lock:
            done = dict(self.done)
            first = dict(self.first)
        rounds = sum(d for d, _ in done.values())
        finished = sum(d >= t for d, t in done.values())
        here = rounds - sum(first.values())  # rounds run in this process
        elapsed = time.monotonic() - self.began
        eta = _clock(elapsed / here * (self.total - rounds)) if here > 0 else "—"
        return (f"all runs: {rounds}/{self.total} rounds, {finished}/{len(self.runs)} runs "
                f"done, {_clock(elapsed)} elapsed, ETA {eta}")


def print_summary(summary: Any) -> None:
    """The closing line of a run: its headline metrics (chrF and exact match first where the
    clients generated text), what they cover, the time and the bytes."""
    console = Console()
    final = summary.final
    metrics = headline_metrics(final, summary.metric)
    value = ", ".join(f"{metric_label(k)} {format_metric(k, final[k])}"
                      for k in metrics if k in final)
    if "clients_evaluated" in final:  # what the metric covers
        value += f" over {int(final['clients_evaluated'])} clients"
    if "dp_epsilon" in final:  # the privacy spent belongs beside what it bought
        value += f" at ε = {final['dp_epsilon']:.3g}, δ = {final.get('dp_delta', math.nan):g}"
    skipped = getattr(summary, "skipped_lines", 0)
    left_out = f"; {skipped} bad line(s) of the data left out" if skipped else ""
    console.print(
        f"[bold]{summary.name}[/] · {summary.method} · seed {summary.seed}: "
        f"{value} after {summary.rounds} rounds "
        f"({summary.seconds_per_round:.3f} s/round, "
        f"{(summary.bytes_up + summary.bytes_down) / 1e6:.1f} MB sent{left_out}) → "
        f"{summary.out_dir}",
        soft_wrap=True,  # one line, also in a log: a line broken mid-number reads badly
    )


def print_comparison(rows: Sequence[ComparisonRow], title: str) -> None:
    """The compare table: one column per headline metric (chrF, exact match, then perplexity
    for a generation task), router ARI, seeds, time and bytes."""
    table = Table(title=title)
    metrics = headline_of(rows[0])
    columns = ("method", *(f"{metric_label(m)} (mean ± std)" for m in metrics), "router ARI",
               "seeds", "s/round", "MB up/round")
    for column in columns:
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=True)
    for r in rows:
        table.add_row(
            r["method"],
            *(format_cell(r.get(f"{m}_mean", math.nan), r.get(f"{m}_std", math.nan), m)
              for m in metrics),
            format_ari(r["ari_mean"], r["ari_std"]),
            str(r["seeds"]),
            f"{r['seconds_per_round']:.3f}",
            f"{r['mb_up_per_round']:.3f}",
        )
    # Off a terminal (a log, a pipe) rich would squeeze the table into 80 columns.
    Console(width=None if sys.stdout.isatty() else 120).print(table)
