"""Recording a run: the results folder, written by observers of the one round loop.

The results folder holds the resolved `config.toml` (every path in it absolute),
`metrics.csv` (one row per evaluated round), `summary.json`, the final state
(`state.safetensors`) and the task's outline (`task.json`: shapes, clusters, tokenizer and
generation settings), so that `floral generate` and the PEFT export work from any folder,
without the data; `checkpoint/` lets an interrupted run resume and end with exactly the
numbers of an uninterrupted one.

`run_rounds` decides whether the run starts afresh or resumes, then runs the driver's loop
(`Driver.run`) with its observers: the `Recorder` (metrics rows and totals), `Checkpoints`,
`Trackers` (TensorBoard, MLflow) and `Progress` (a callback per round).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from floral.checkpoint import Checkpoint, atomic_write_text, json_safe, save_tensors, writing
from floral.data import FederatedTask, task_outline
from floral.engines.driver import Driver, Observer, RoundResult
from floral.errors import ConfigError, DivergedError, RoundFailedError
from floral.experiment.config import TABLES, ExperimentConfig, resolve_config
from floral.experiment.paths import absolute_path, comparable_paths
from floral.tracking import Sinks, flat_params, open_sinks
from floral.train.headline import headline_metrics, order_headline
from floral.train.state import TensorDict

__all__ = [
    "TASK_FILE",
    "TUNABLE",
    "Checkpoints",
    "Progress",
    "ProgressFn",
    "Recorder",
    "RunSummary",
    "Trackers",
    "check_resumable",
    "resumes",
    "run_rounds",
]


@dataclass
class RunSummary:
    name: str
    method: str
    seed: int
    rounds: int
    metric: str  # the objective's: accuracy | mse | perplexity (see `headline`)
    final: dict[str, float]
    seconds: float  # training and evaluation, excluding data loading
    seconds_per_round: float  # training only
    bytes_down: int
    bytes_up: int
    out_dir: str
    history: list[dict[str, float]] = field(default_factory=list)
    # Lines of the data that were left out as bad (`task.bad_lines = "skip"`).
    skipped_lines: int = 0

    @property
    def headline(self) -> tuple[str, ...]:
        """The metrics the run is judged by, the lead first: chrF and exact match where the
        clients generated text, then `metric` (floral.train.headline)."""
        return headline_metrics(self.final, self.metric)

    def to_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data.pop("history")
        return data


ProgressFn = Callable[[RoundResult, dict[str, float]], None]
log = logging.getLogger("floral")


def run_rounds(
    engine: Driver,
    config: ExperimentConfig,
    out: Path,
    *,
    resume: bool | str = False,
    overwrite: bool = False,
    on_round: ProgressFn | None = None,
    task: FederatedTask | None = None,
) -> RunSummary:
    """Drive an engine to `train.rounds`, writing the results folder as it goes; with the
    engine's `task`, the folder also gets its outline (`task.json`), which is what generating
    and exporting from the finished run need besides config.toml and the state.

    `resume=True` continues from the folder's checkpoint (an error if it is from another
    experiment or there is none); `resume="auto"` continues only from a checkpoint of the same
    experiment, else starts afresh. Starting afresh in a folder that holds a run needs
    `overwrite` (implied by "auto"). A run whose global model stops being finite saves its last
    good state as the checkpoint and stops with a one-line error."""
    recorder = Recorder(out, engine.objective.metric)
    identity = _identity(config)
    changes = _can_resume(identity, out, strict=resume is True) if resume else None
    if changes is not None:
        recorder.restore(engine)
        if changes:
            _record_changes(config, out, engine.round, changes)
        else:  # settings a resume may change without a record (rounds, threads) are this run's
            _write_config(config, out)
    else:
        _start_afresh(out, overwrite=overwrite or resume == "auto")
        _write_config(config, out)
        recorder.record_initial(engine)
    if task is not None:
        tokenizer = absolute_path(config.task.tokenizer, Path.cwd())
        atomic_write_text(out / TASK_FILE, json.dumps(task_outline(task, tokenizer), indent=2))
    sinks = open_sinks(config.output.tensorboard, config.output.mlflow, out, config.name,
                       flat_params(config.to_dict()))
    # In this order: checkpoints and trackers read the recorder's rows of the round.
    observers: list[Observer] = [
        recorder, Checkpoints(recorder, identity, config.engine.checkpoint_every),
        Trackers(recorder, sinks, initial=changes is None),
    ]
    if on_round is not None:
        observers.append(Progress(recorder, on_round))
    try:
        engine.run(observers)
    except DivergedError as error:
        kept = max(engine.round - 1, 0) if error.start_suspect else engine.round
        raise DivergedError(
            f"{error}; the last good state (round {kept}) is saved in "
            f"{out / 'checkpoint'}: lower train.lr (or another rate) and continue from it with "
            f"--resume --set train.lr=..."
        ) from None
    except RoundFailedError as error:
        raise RoundFailedError(
            f"{error}; the last whole round ({engine.round}) is saved in {out / 'checkpoint'}: "
            "fix the clients and rerun with --resume"
        ) from None
    save_tensors(engine.state_dict(), out / "state.safetensors")
    summary = recorder.summary(config, engine)
    summary.skipped_lines = task.skipped_lines if task is not None else 0
    text = json.dumps(json_safe(summary.to_json()), indent=2, allow_nan=False)
    atomic_write_text(out / "summary.json", text + "\n")
    return summary


class Recorder(Observer):
    """Metrics rows and running totals of one run, in `metrics.csv` as they come."""

    def __init__(self, out: Path, metric: str) -> None:
        self.out, self.metric = out, metric
        self.rows: list[dict[str, float]] = []
        self.totals = {"bytes_down": 0, "bytes_up": 0, "train_seconds": 0.0, "seconds": 0.0,
                       "updates_applied": 0, "updates_dropped": 0}
        self.latest: dict[str, float] = {}
        self._clock = time.perf_counter()

    def record_initial(self, engine: Driver) -> None:
        self._add_row(0, engine.evaluate(), float("nan"))

    def round_done(self, driver: Driver, result: RoundResult) -> None:
        self.totals["bytes_down"] += result.bytes_down
        self.totals["bytes_up"] += result.bytes_up
        self.totals["train_seconds"] += result.seconds
        self.totals["updates_applied"] += result.applied
        self.totals["updates_dropped"] += len(result.dropped)
        if result.eval:
            self._add_row(result.round, result.eval, result.train_loss)

    def progress(self, round_: int) -> dict[str, Any]:
        """What a checkpoint keeps of the recording after round `round_`."""
        return {"round": round_, "rows": list(self.rows), "totals": dict(self.totals)}

    def _add_row(self, round_: int, metrics: dict[str, float], train_loss: float) -> None:
        now = time.perf_counter()
        self.totals["seconds"] += now - self._clock
        self._clock = now
        row = {"round": round_, **metrics, "train_loss": train_loss}
        row.update({k: self.totals.get(k, 0) for k in (
            "bytes_down", "bytes_up", "updates_applied", "updates_dropped")})
        row["seconds"] = round(self.totals["seconds"], 3)
        self.rows.append(row)
        self.latest = row
        self._write_csv()

    def _write_csv(self) -> None:
        text = io.StringIO(newline="")
        # Columns in order of first appearance: a round that evaluates other clients (the
        # sampled ones) may add per-client or per-cluster columns; missing cells stay empty.
        fields = list(dict.fromkeys(key for row in self.rows for key in row))
        writer = csv.DictWriter(text, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.out / "metrics.csv", text.getvalue())

    def restore(self, engine: Driver) -> None:
        state, progress = Checkpoint(self.out / "checkpoint").read()
        engine.load_state_dict(state)
        if progress.get("round") != engine.round:
            raise ConfigError(f"{self.out / 'checkpoint'}: its files disagree on the round")
        self.rows = [_numbers(r) for r in progress["rows"] if r["round"] <= engine.round]
        self.totals = {"updates_applied": 0, "updates_dropped": 0, **progress["totals"]}
        self.latest = self.rows[-1] if self.rows else {}
        self._clock = time.perf_counter()

    def summary(self, config: ExperimentConfig, engine: Driver) -> RunSummary:
        final = {k: v for k, v in self.latest.items() if k not in ("round", "seconds")}
        return RunSummary(
            name=config.name,
            method=config.method_name,
            seed=config.seed,
            rounds=engine.round,
            metric=self.metric,
            final=final,
            seconds=round(self.totals["seconds"], 3),
            seconds_per_round=round(self.totals["train_seconds"] / max(engine.round, 1), 5),
            bytes_down=int(self.totals["bytes_down"]),
            bytes_up=int(self.totals["bytes_up"]),
            out_dir=str(self.out),
            history=self.rows,
        )


Settled = tuple[TensorDict, dict[str, Any]]  # a whole round's state and recording


class Checkpoints(Observer):
    """`checkpoint/` every `every` rounds (0: never on schedule), and the last good round's
    when the loop stops early, whatever a round cut short has changed since."""

    def __init__(self, recorder: Recorder, identity: Mapping[str, Any], every: int) -> None:
        self.recorder, self.identity, self.every = recorder, identity, every
        self.folder = recorder.out / "checkpoint"
        self.settled: Settled | None = None
        self.previous: Settled | None = None

    def started(self, driver: Driver) -> None:
        self._settle(driver)

    def round_done(self, driver: Driver, result: RoundResult) -> None:
        self._settle(driver)
        if self.every and driver.round % self.every == 0:
            self._write(self.settled)

    def stopped(self, driver: Driver, error: BaseException) -> None:
        # A round whose training diverged from the state it started from condemns that state
        # too: the one before it is the last good one.
        suspect = isinstance(error, DivergedError) and error.start_suspect
        self._write(self.previous if suspect else self.settled)

    def _settle(self, driver: Driver) -> None:
        """Remember the state after a whole round, and the one before. Rounds replace tensors
        and never change them in place, so holding the references costs nothing."""
        now = (driver.state_dict(), self.recorder.progress(driver.round))
        self.previous, self.settled = self.settled or now, now

    def _write(self, settled: Settled | None) -> None:
        if settled is not None:
            state, progress = settled
            Checkpoint(self.folder).write(state, progress, self.identity)


class Trackers(Observer):
    """Every evaluated round's metrics (and routers) to TensorBoard and MLflow, round 0 (the
    model before training: a frozen base with fresh adaptors) included when the run starts
    afresh (`initial`); the headline metrics lead each round's values."""

    def __init__(self, recorder: Recorder, sinks: Sinks, initial: bool = False) -> None:
        self.recorder, self.sinks, self.initial = recorder, sinks, initial

    def started(self, driver: Driver) -> None:
        if self.initial and self.recorder.rows:
            self.sinks.log(0, self._ordered(self.recorder.rows[0]), driver.router_weights())

    def _ordered(self, row: Mapping[str, float]) -> dict[str, float]:
        return order_headline(row, self.recorder.metric)

    def round_done(self, driver: Driver, result: RoundResult) -> None:
        if result.eval:
            self.sinks.log(result.round, self._ordered(self.recorder.latest),
                           driver.router_weights())

    def closed(self, driver: Driver) -> None:
        self.sinks.close()


class Progress(Observer):
    """A callback after every round with the latest metrics row (the CLI's progress bar)."""

    def __init__(self, recorder: Recorder, on_round: ProgressFn) -> None:
        self.recorder, self.on_round = recorder, on_round

    def round_done(self, driver: Driver, result: RoundResult) -> None:
        self.on_round(result, self.recorder.latest)


def _numbers(row: Mapping[str, Any]) -> dict[str, float]:
    """A metrics row as saved in JSON, where NaN was written as null."""
    return {k: math.nan if v is None else v for k, v in row.items()}


# Settings that may change between an interrupted run and its resumption.
# Where a run executes may change too (resume a GPU run on a CPU): numbers then follow the device.
_RESUMABLE_CHANGES = {
    ("train", "rounds"), ("engine", "checkpoint_every"), ("output", "dir"),
    ("engine", "device"), ("engine", "threads"), ("engine", "compile"),
}
# What a results folder holds of a run: starting afresh over them needs --overwrite.
# (`nodes`: a Flower simulation's virtual nodes keep their clients' private state there.)
_RUN_FILES = (
    "config.toml", "metrics.csv", "summary.json", "state.safetensors", "checkpoint", "nodes",
    "changes.json", "nodes.json", "task.json",
)
TASK_FILE = "task.json"  # the task's outline (floral.data.task.task_outline)


def _identity(config: ExperimentConfig) -> dict[str, Any]:
    """The experiment a checkpoint belongs to: its resolved config, less what may change."""
    identity = comparable_paths(config.to_dict())
    for table, key in _RESUMABLE_CHANGES:
        identity.get(table, {}).pop(key, None)
    return identity


# Optimization settings a resumed run may change (`--resume`): the experiment stays the same
# one, only how it is optimized from there on. Each change is recorded in `changes.json`.
TUNABLE = tuple(("train", key) for key in (
    "lr", "adaptor_lr", "router_lr", "server_lr", "momentum", "weight_decay",
    "server_momentum", "lr_schedule", "warmup_rounds", "max_grad_norm",
))
Change = tuple[str, Any, Any]  # (table.key, the checkpoint's value, this run's)


def check_resumable(config: ExperimentConfig, out: Path) -> None:
    """`--resume`'s checks, for an engine that must know before it starts: `out` holds a
    complete checkpoint of this experiment (else a one-line error)."""
    _can_resume(_identity(config), out, strict=True)


def resumes(config: ExperimentConfig, out: Path) -> bool:
    """Whether `resume="auto"` continues the run in `out` (a checkpoint of this experiment) or
    starts it afresh."""
    return _can_resume(_identity(config), out, strict=False) is not None


def _can_resume(identity: Mapping[str, Any], out: Path, strict: bool) -> list[Change] | None:
    """The settings this run changes from the checkpoint's (strict: only `TUNABLE` ones may
    differ, else a one-line error), or None where there is nothing to resume (not strict:
    also where the checkpoint is another experiment's)."""
    checkpoint = Checkpoint(out / "checkpoint")
    if not checkpoint.exists():
        if strict:
            raise ConfigError(f"--resume: {out} holds no complete checkpoint to resume from")
        return None
    try:
        # Resolved again, so a setting added to floral since the checkpoint takes its default.
        saved = _identity(resolve_config(checkpoint.identity()))
        return _changes(identity, saved, out, TUNABLE if strict else ())
    except ConfigError:
        if strict:
            raise
        return None


def _changes(
    current: Mapping[str, Any], saved: Mapping[str, Any], out: Path,
    tunable: Sequence[tuple[str, str]],
) -> list[Change]:
    found: list[Change] = []
    for table in TABLES:
        here, there = current.get(table, {}), saved.get(table, {})
        for key in sorted(set(here) | set(there)):
            if here.get(key) == there.get(key):
                continue
            if (table, key) not in tunable:
                allowed = ", ".join(f"{t}.{k}" for t, k in tunable)
                hint = f" (a resumed run may change {allowed})" if allowed else ""
                raise ConfigError(
                    f"{table}.{key}: differs from the checkpoint's config in {out}{hint}")
            found.append((f"{table}.{key}", there.get(key), here.get(key)))
    for key in ("seed",):
        if current.get(key) != saved.get(key):
            raise ConfigError(f"{key}: differs from the checkpoint's config in {out}")
    return found


def _record_changes(
    config: ExperimentConfig, out: Path, round_: int, changes: Sequence[Change]
) -> None:
    """The run folder says what changed when: `changes.json` (appended) and `config.toml`."""
    path = out / "changes.json"
    kept = json.loads(path.read_text()) if path.exists() else []
    kept += [{"round": round_, "key": key, "from": old, "to": new} for key, old, new in changes]
    atomic_write_text(path, json.dumps(kept, indent=2) + "\n")
    _write_config(config, out)
    for key, old, new in changes:
        log.warning("resumed after round %d with %s = %r (was %r)", round_, key, new, old)


def _start_afresh(out: Path, overwrite: bool) -> None:
    """An empty results folder, or one whose run files `overwrite` allows to replace."""
    found = [name for name in _RUN_FILES if (out / name).exists()]
    if found and not overwrite:
        what = "a finished run" if "summary.json" in found else "another run's results"
        raise ConfigError(
            f"{out} holds {what} ({', '.join(found)}): pass --overwrite to replace it, "
            "--resume to continue it, or --out to write elsewhere"
        )
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
        for name in found:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


def _write_config(config: ExperimentConfig, out: Path) -> None:
    atomic_write_text(out / "config.toml", tomli_w.dumps(config.to_dict()))
