"""Several methods on the same task, over several seeds, on all cores.

Each (method, seed) is an ordinary experiment with its own results folder; a run whose
`summary.json` already exists for the same config is not run again.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import queue
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
import torch

from floral.checkpoint import atomic_write_text, make_folder, read_json
from floral.config import parse_value, tomllib
from floral.errors import ConfigError, FloralError, RunCrashedError
from floral.experiment import (
    ExperimentConfig,
    RunSummary,
    read_experiment,
    resolve_config,
    resumes,
)
from floral.experiment.paths import comparable_paths
from floral.run import run_experiment

__all__ = [
    "MethodSpec",
    "RunSpec",
    "finished_summary",
    "load_base",
    "load_summary",
    "parse_method_specs",
    "plan_runs",
    "run_all",
    "run_cost",
    "run_peak_memory",
]


@dataclass(frozen=True)
class MethodSpec:
    """`floral:rank=0.1:train.router_lr=0.5` -> name "floral", options {rank: 0.1} and the
    override train.router_lr = 0.5 (a dotted key sets any setting of that run)."""

    label: str
    name: str
    options: tuple[tuple[str, Any], ...]

    @property
    def folder(self) -> str:
        name = self.label.replace(":", "_").replace("/", "_").replace(",", "-")
        return "".join(c for c in name if c not in '"[]* ?')  # nothing a shell would expand


@dataclass(frozen=True)
class RunSpec:
    method: MethodSpec
    seed: int
    config: ExperimentConfig
    out_dir: Path

    @property
    def key(self) -> str:
        """Unique within a sweep over several tasks, and what the progress view shows."""
        return f"{self.config.name} · {self.method.label} seed {self.seed}"


def parse_method_specs(text: str) -> list[MethodSpec]:
    specs = []
    for item in filter(None, (s.strip() for s in _top_level_split(text))):
        name, *pieces = item.split(":")
        pairs: list[str] = []
        for piece in pieces:  # "comm.upload=topk:0.1": a piece without "=" belongs to the value
            if "=" not in piece and pairs:
                pairs[-1] += ":" + piece
            else:
                pairs.append(piece)
        options = []
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep:
                raise ConfigError(f"--methods {item!r}: expected name:key=value, got {pair!r}")
            options.append((key, parse_value(value)))
        specs.append(MethodSpec(item, name, tuple(options)))
    if not specs:
        raise ConfigError("--methods: give at least one method, e.g. floral,fedavg")
    return specs


def _top_level_split(text: str) -> list[str]:
    """`a,b:ranks=[2,4],c` -> a, b:ranks=[2,4], c: a comma inside brackets is the value's."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ConfigError(f"--methods {text!r}: unbalanced brackets")
    return [*items, text[start:]]


def plan_runs(
    base: dict[str, Any],
    methods: Sequence[MethodSpec],
    seeds: Sequence[int],
    out: Path,
    overrides: Sequence[str] = (),
) -> list[RunSpec]:
    """Resolve (and so check) every run's config before any of them starts."""
    runs = []
    base_method = base.get("method", {})
    for spec in methods:
        same = isinstance(base_method, dict) and base_method.get("name") == spec.name
        options = {k: v for k, v in spec.options if "." not in k}
        settings = [f"{k}={_toml_literal(v)}" for k, v in spec.options if "." in k]
        method = {**(base_method if same else {}), "name": spec.name, **options}
        for seed in seeds:
            data = {**base, "method": method, "seed": seed}
            config = resolve_config(data, [*overrides, *settings])
            runs.append(RunSpec(spec, seed, config, out / spec.folder / f"seed{seed}"))
    return runs


def _toml_literal(value: Any) -> str:
    return tomli_w.dumps({"v": value}).partition("=")[2].strip()


def load_base(path: str | os.PathLike) -> dict[str, Any]:
    return read_experiment(path)


def finished_summary(run: RunSpec) -> RunSummary | None:
    """The summary of an identical finished run in the run's folder, if there is one."""
    summary_path, config_path = run.out_dir / "summary.json", run.out_dir / "config.toml"
    if not (summary_path.exists() and config_path.exists()):
        return None
    try:
        # Resolved again, so settings added to floral since the run take their defaults.
        saved = _results_settings(resolve_config(tomllib.loads(config_path.read_text())))
    except (ConfigError, tomllib.TOMLDecodeError):
        return None  # a config this version cannot read is not the same run
    if saved != _results_settings(run.config):
        return None
    return load_summary(run.out_dir)


# Settings that do not change a run's numbers: where it is written, how often it checkpoints.
_BOOKKEEPING = (("output", "dir"), ("engine", "checkpoint_every"))


def _results_settings(config: ExperimentConfig) -> dict[str, Any]:
    data = comparable_paths(json.loads(json.dumps(config.to_dict())))
    for table, key in _BOOKKEEPING:
        data.get(table, {}).pop(key, None)
    return data


def load_summary(out_dir: Path) -> RunSummary:
    """A finished run's summary.json, with its metrics.csv as the history."""
    import csv

    data = read_json(out_dir / "summary.json")
    with open(out_dir / "metrics.csv") as f:
        # An empty cell: a column of another round (a client evaluated only then).
        history = [
            {k: float(v) if v else math.nan for k, v in row.items()} for row in csv.DictReader(f)
        ]
    return RunSummary(**data, history=history)


Progress = Callable[[str, int, int, dict[str, float]], None]

COST_FILE = "cost.json"  # written next to summary.json by the sweep
CRASH_FILE = "error.txt"  # the traceback of a run that crashed


def run_all(
    runs: Sequence[RunSpec], jobs: int = 1, on_progress: Progress | None = None
) -> dict[str, RunSummary]:
    """Run every spec (skipping finished ones), `jobs` at a time; summaries by run key."""
    results: dict[str, RunSummary] = {}
    todo = []
    for run in runs:
        done = finished_summary(run)
        if done is not None:
            results[run.key] = done
            if on_progress:
                on_progress(run.key, done.rounds, done.rounds, done.history[-1])
        else:
            todo.append(run)
    failures: dict[str, FloralError] = {}
    if jobs <= 1 or len(todo) <= 1:
        threads = torch.get_num_threads()
        _single_thread()  # the same numbers as in a worker process, and one core as promised
        try:
            for run in todo:
                try:
                    results[run.key] = _run_one(run, on_progress)
                except FloralError as error:
                    failures[run.key] = error
                except Exception as error:  # a crash stops its run, not the grid
                    failures[run.key] = crashed(run, error)
        finally:
            torch.set_num_threads(threads)
        _raise_failures(failures)
        return results
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        events = manager.Queue()
        # One process per run (Python 3.11+), so that each run's peak memory is its own.
        fresh = sys.version_info >= (3, 11)
        options: dict[str, Any] = {"max_tasks_per_child": 1} if fresh else {}
        with ProcessPoolExecutor(jobs, ctx, _single_thread, **options) as pool:
            futures: dict[Future, RunSpec] = {
                pool.submit(_run_in_worker, run, events, fresh): run for run in todo
            }
            pending = set(futures)
            while pending:
                done_set, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(events, on_progress)
                for future in done_set:
                    _collect(futures[future], future, results, failures)
            _drain(events, on_progress)
    _raise_failures(failures)
    return results


def _collect(
    run: RunSpec, future: Future, results: dict[str, RunSummary], failures: dict[str, FloralError]
) -> None:
    # A user-facing error (missing data, say) fails its run, not the rest of the grid.
    try:
        results[run.key] = future.result()
    except FloralError as error:
        failures[run.key] = error
    except Exception as error:
        failures[run.key] = crashed(run, error)


def crashed(run: RunSpec, error: Exception) -> RunCrashedError:
    """The one-line error for a run that crashed; its full traceback (a worker's included)
    goes to `error.txt` in the run's folder."""
    make_folder(run.out_dir)
    path = run.out_dir / CRASH_FILE
    atomic_write_text(path, "".join(traceback.format_exception(error)))
    return RunCrashedError(f"{type(error).__name__}: {error} (traceback in {path})")


def _raise_failures(failures: dict[str, FloralError]) -> None:
    """The first failure, named by its run, with its own kind (and so exit status)."""
    if failures:
        key, error = next(iter(failures.items()))
        others = f" ({len(failures) - 1} other run(s) failed too)" if len(failures) > 1 else ""
        raise type(error)(f"{key}: {error}{others}")


def _run_one(run: RunSpec, on_progress: Progress | None, fresh: bool = False) -> RunSummary:
    """One run; `fresh`: this process runs nothing else, so its peak memory is the run's."""
    total = run.config.train.rounds
    resumed = resumes(run.config, run.out_dir)  # else run_experiment starts it afresh
    # A resumed run carries the CPU time its earlier attempts recorded, round by round, so a
    # grid cut short (a session's end, a reboot) still reports what each run cost in all.
    earlier = _recorded_cpu(run.out_dir) if resumed else 0.0  # None: an attempt recorded none
    start = time.process_time()

    def write_cost(finished: bool = False, peak_mb: float | None = None) -> None:
        cost: dict[str, Any] = {
            "cpu_seconds": round((earlier or 0.0) + time.process_time() - start, 2),
            "finished": finished,
            "resumed": resumed,
            "complete": earlier is not None,  # every attempt's CPU time is in cpu_seconds
            "peak_memory_mb": peak_mb,
        }
        atomic_write_text(run.out_dir / COST_FILE, json.dumps(cost) + "\n")

    def report(result, latest):  # noqa: ANN001
        write_cost()
        if on_progress:
            on_progress(run.key, result.round, total, latest)

    summary = run_experiment(run.config, run.out_dir, resume="auto", on_round=report)
    write_cost(True, _peak_memory_mb() if fresh else None)
    return summary


def _recorded_cpu(out_dir: Path) -> float | None:
    """The CPU seconds earlier attempts at a run recorded, or None if they recorded none."""
    path = out_dir / COST_FILE
    if not path.exists():
        return None
    cost = read_json(path)
    return float(cost["cpu_seconds"]) if cost.get("complete") else None


def run_cost(out_dir: Path) -> float | None:
    """CPU seconds a finished run took (one thread: data, training and evaluation; over all
    its attempts when it was resumed, rounds an interruption made it redo included), or None
    when unknown or only partly measured (an attempt that recorded no CPU time).

    CPU time, unlike the wall time in summary.json, hardly depends on what else the machine
    is running.
    """
    path = out_dir / COST_FILE
    if not path.exists():
        return None
    cost = read_json(path)
    complete = cost.get("complete", not cost["resumed"])  # older files: a resume is partial
    return float(cost["cpu_seconds"]) if complete and cost.get("finished", True) else None


def run_peak_memory(out_dir: Path) -> float | None:
    """The peak resident memory (MB) of a run's process, when the sweep measured it."""
    path = out_dir / COST_FILE
    return read_json(path).get("peak_memory_mb") if path.exists() else None


def _peak_memory_mb() -> float | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    # ru_maxrss is in kilobytes on Linux (bytes on macOS, where this reads 1024 times high)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _run_in_worker(run: RunSpec, events: Any, fresh: bool) -> RunSummary:
    def forward(key: str, done: int, total: int, latest: dict[str, float]) -> None:
        events.put((key, done, total, latest))

    return _run_one(run, forward, fresh)


def _drain(events: Any, on_progress: Progress | None) -> None:
    while True:
        try:
            event = events.get_nowait()
        except queue.Empty:
            return
        if on_progress:
            on_progress(*event)


def _single_thread() -> None:
    # Parallel runs each take one core; intra-op threads would fight over the same cores.
    torch.set_num_threads(1)
