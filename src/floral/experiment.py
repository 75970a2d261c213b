"""An experiment: a TOML file in, a results folder out.

    name = "mnist5k-label-shift"
    seed = 0
    [task]    dataset, shift, clients, clusters       (floral.data.TaskConfig)
    [model]   name, hidden                            (floral.models.ModelConfig)
    [method]  name, then that method's own options    (floral.methods)
    [train]   rounds, sampling, local SGD, server     (floral.train.TrainConfig)
    [engine]  name, evaluation, checkpoints           (floral.engines.EngineConfig)
    [comm]    download and upload codecs              (floral.comm.CommConfig)
    [output]  dir

The results folder holds the resolved `config.toml`, `metrics.csv` (one row per evaluated
round), `summary.json` and the final state (`state.safetensors`); `checkpoint/` lets an
interrupted run resume and end with exactly the numbers of an uninterrupted one.

`run_rounds` drives any engine (floral.engines.driver.Driver) to the end and writes the folder;
floral.run.run_experiment picks the engine.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
import torch

from floral.checkpoint import Checkpoint, atomic_write_text, json_safe, save_tensors
from floral.comm import CommConfig, build_codec
from floral.config import from_dict, parse_value, set_dotted, to_dict, tomllib
from floral.data import FederatedTask, TaskConfig, build_task
from floral.engines.config import EngineConfig, check_engine_config
from floral.engines.driver import Driver, RoundResult, check_aggregation, check_privacy
from floral.engines.local import LocalEngine
from floral.errors import ConfigError, DivergedError
from floral.methods import Method, Role, get_method
from floral.models import ModelConfig, build_model, enable_gradient_checkpointing
from floral.models.quantize import check_quantize, quantize_frozen
from floral.tracking import check_sinks, flat_params, open_sinks
from floral.train.device import DTYPES, Placement, cast_tensors, check_dtype, resolve_device
from floral.train.loop import TrainConfig, check_local_optimizer

__all__ = [
    "ExperimentConfig",
    "OutputConfig",
    "RunSummary",
    "build_engine",
    "build_setup",
    "check_resumable",
    "load_config",
    "placement_of",
    "read_experiment",
    "resolve_config",
    "run_rounds",
]

TABLES = ("task", "model", "method", "train", "engine", "comm", "output")


@dataclass
class OutputConfig:
    dir: str = ""  # "" = results/<name>
    tensorboard: bool = False  # every metrics row to TensorBoard, under <results>/tensorboard
    mlflow: bool = False  # every metrics row to MLflow (MLFLOW_TRACKING_URI, else a SQLite file)


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    description: str = ""
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: dict[str, Any] = field(default_factory=lambda: {"name": "floral"})
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @property
    def method_name(self) -> str:
        return self.method["name"]

    def build_method(self) -> Method:
        options = {k: v for k, v in self.method.items() if k != "name"}
        return get_method(self.method_name, options)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read an experiment file, apply `key=value` overrides, and check everything."""
    return resolve_config(read_experiment(path), overrides)


def read_experiment(path: str | os.PathLike) -> dict[str, Any]:
    """The raw tables of an experiment file; `name` defaults to the file's stem."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such experiment file") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error})") from None
    data.setdefault("name", path.stem)
    return data


def resolve_config(data: Mapping[str, Any], overrides: Sequence[str] = ()) -> ExperimentConfig:
    """An `ExperimentConfig` from nested dicts; every key and type checked, method included."""
    tables: dict[str, Any] = copy.deepcopy(dict(data))  # a private copy
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value")
        set_dotted(tables, key.strip(), parse_value(value.strip()))
    method = tables.get("method", {"name": "floral"})
    if not isinstance(method, dict) or not isinstance(method.get("name"), str):
        raise ConfigError("method.name: required, e.g. name = \"floral\"")
    config = from_dict(ExperimentConfig, {**tables, "method": {}}, "")
    config.method = dict(method)
    config.build_method()  # checks the method's name and options now, before any work
    check_values(config)
    return config


def check_values(config: ExperimentConfig) -> None:
    """Value checks that do not need the data (the data checks its own when loaded)."""
    positive = {
        "train.rounds": config.train.rounds,
        "train.local_epochs": config.train.local_epochs,
        "train.batch_size": config.train.batch_size,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be at least 1, got {value}")
    if not 0 < config.train.clients_per_round <= 1:
        raise ConfigError(
            f"train.clients_per_round: must be in (0, 1], got {config.train.clients_per_round}"
        )
    if config.train.lr <= 0:
        raise ConfigError(f"train.lr: must be positive, got {config.train.lr}")
    check_local_optimizer(config.train)
    check_sinks(config.output.tensorboard, config.output.mlflow)
    check_engine_config(config.engine)
    placement = placement_of(config)  # an unknown device or a precision it cannot run stops here
    check_quantize(config.model.quantize, placement.device)
    method = config.build_method()
    check_aggregation(config.train.aggregation, method)
    check_privacy(config.train, method)
    build_codec(config.comm.download, "comm.download")
    build_codec(config.comm.upload, "comm.upload")


def build_setup(
    config: ExperimentConfig, task: FederatedTask | None = None
) -> tuple[Method, FederatedTask, torch.nn.Module]:
    """Method, data and model from a config, seeded so that the same config gives the same ones.

    Every engine builds from here: a Flower client rebuilds exactly the local engine's model.
    `task` replaces the config's (a Flower node's own data, of the same shape).
    """
    task = build_task(config.task, config.seed) if task is None else task
    method = config.build_method()
    torch.manual_seed(config.seed)
    model = build_model(config.model, task)
    if config.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model = method.build_model(model, task)
    # Only what never changes is stored in low precision: trained tensors stay float32.
    frozen = [name for name, role in method.roles(model).items() if role is Role.FROZEN]
    cast_tensors(model, frozen, DTYPES[config.model.dtype])
    quantize_base(config, method, model, frozen)
    return method, task, model


def quantize_base(
    config: ExperimentConfig, method: Method, model: torch.nn.Module, frozen: list[str]
) -> None:
    """`model.quantize`: the frozen linear layers in 8 or 4 bits, checked to stay frozen."""
    mode = config.model.quantize
    names = quantize_frozen(model, set(frozen), mode, DTYPES[config.model.dtype])
    if mode == "none":
        return
    if not names:
        raise ConfigError(
            f"model.quantize = {mode!r}: no linear layer to quantize: {config.method_name} "
            "trains them all (use a method with a frozen base, e.g. fedit, or "
            "method.train_base = false), or, for nf4 on a CPU, none has an input width that is a "
            "multiple of 64 and an output width that is a multiple of 32"
        )
    roles = method.roles(model)
    moving = [n for n in roles if roles[n] is not Role.FROZEN and n.rpartition(".")[0] in names]
    if moving:
        raise ConfigError(f"model.quantize: {moving[0]} would be quantized but is not frozen")


def placement_of(config: ExperimentConfig, device: str = "") -> Placement:
    """Where and how clients train: `engine.device` (or `device`, a node's own choice),
    `model.dtype` and `engine.compile`, checked against this machine."""
    key = "engine.device" if not device else "device"
    target = resolve_device(device or config.engine.device, key)
    return Placement(target, check_dtype(config.model.dtype, target), config.engine.compile)


def build_engine(
    config: ExperimentConfig, task: FederatedTask | None = None
) -> tuple[LocalEngine, FederatedTask]:
    """The in-process engine for a config (on `task` instead of the config's, if given)."""
    placement = placement_of(config)
    method, task, model = build_setup(config, task)
    engine = LocalEngine(
        method, task, model, config.train, config.engine, config.seed, config.comm, placement
    )
    return engine, task


@dataclass
class RunSummary:
    name: str
    method: str
    seed: int
    rounds: int
    metric: str  # accuracy | mse
    final: dict[str, float]
    seconds: float  # training and evaluation, excluding data loading
    seconds_per_round: float  # training only
    bytes_down: int
    bytes_up: int
    out_dir: str
    history: list[dict[str, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data.pop("history")
        return data


ProgressFn = Callable[[RoundResult, dict[str, float]], None]


def run_rounds(
    engine: Driver,
    config: ExperimentConfig,
    out: Path,
    *,
    resume: bool | str = False,
    overwrite: bool = False,
    on_round: ProgressFn | None = None,
) -> RunSummary:
    """Drive an engine to `train.rounds`, writing the results folder as it goes.

    `resume=True` continues from the folder's checkpoint (an error if it is from another
    experiment or there is none); `resume="auto"` continues only from a checkpoint of the same
    experiment, else starts afresh. Starting afresh in a folder that holds a run needs
    `overwrite` (implied by "auto"). A run whose global model stops being finite saves its last
    good state as the checkpoint and stops with a one-line error."""
    tracker = _Tracker(out, engine.objective.metric)
    identity = _identity(config)
    if resume and _can_resume(identity, out, strict=resume is True):
        tracker.restore(engine)
    else:
        _start_afresh(out, overwrite=overwrite or resume == "auto")
        _write_config(config, out)
        tracker.record_initial(engine)
    tracker.settle(engine)
    checkpoint_every = config.engine.checkpoint_every
    sinks = open_sinks(config.output.tensorboard, config.output.mlflow, out, config.name,
                       flat_params(config.to_dict()))
    try:
        while engine.round < config.train.rounds:
            result = engine.run_round()
            tracker.add(result)
            tracker.settle(engine)
            if result.eval:
                sinks.log(result.round, tracker.latest, engine.router_weights())
            if on_round is not None:
                on_round(result, tracker.latest)
            if checkpoint_every and engine.round % checkpoint_every == 0:
                tracker.checkpoint(engine, identity)
    except DivergedError as error:
        tracker.checkpoint_settled(identity)
        raise DivergedError(
            f"{error}; the last good state (round {engine.round}) is saved in "
            f"{out / 'checkpoint'}: lower train.lr (or the other rates) and rerun"
        ) from None
    except KeyboardInterrupt:
        tracker.checkpoint_settled(identity)  # the last whole round, not one cut short
        raise
    finally:
        sinks.close()
    save_tensors(engine.state_dict(), out / "state.safetensors")
    summary = tracker.summary(config, engine)
    text = json.dumps(json_safe(summary.to_json()), indent=2, allow_nan=False)
    atomic_write_text(out / "summary.json", text + "\n")
    return summary


class _Tracker:
    """Metrics rows, running totals and checkpoints of one run."""

    def __init__(self, out: Path, metric: str) -> None:
        self.out, self.metric = out, metric
        self.rows: list[dict[str, float]] = []
        self.totals = {"bytes_down": 0, "bytes_up": 0, "train_seconds": 0.0, "seconds": 0.0}
        self.latest: dict[str, float] = {}
        self._clock = time.perf_counter()

    def record_initial(self, engine: Driver) -> None:
        self._add_row(0, engine.evaluate(), float("nan"))

    def add(self, result: RoundResult) -> None:
        self.totals["bytes_down"] += result.bytes_down
        self.totals["bytes_up"] += result.bytes_up
        self.totals["train_seconds"] += result.seconds
        if result.eval:
            self._add_row(result.round, result.eval, result.train_loss)

    def _add_row(self, round_: int, metrics: dict[str, float], train_loss: float) -> None:
        now = time.perf_counter()
        self.totals["seconds"] += now - self._clock
        self._clock = now
        row = {"round": round_, **metrics, "train_loss": train_loss}
        row.update({k: self.totals[k] for k in ("bytes_down", "bytes_up")})
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

    def checkpoint(self, engine: Driver, identity: Mapping[str, Any]) -> None:
        progress = {"round": engine.round, "rows": self.rows, "totals": self.totals}
        Checkpoint(self.out / "checkpoint").write(engine.state_dict(), progress, identity)

    def settle(self, engine: Driver) -> None:
        """Remember the state after a whole round. Rounds replace tensors and never change
        them in place, so holding the references costs nothing and stays that round's."""
        progress = {"round": engine.round, "rows": list(self.rows), "totals": dict(self.totals)}
        self.settled = (engine.state_dict(), progress)

    def checkpoint_settled(self, identity: Mapping[str, Any]) -> None:
        """The last whole round's checkpoint, whatever a round cut short has changed since."""
        state, progress = self.settled
        Checkpoint(self.out / "checkpoint").write(state, progress, identity)

    def restore(self, engine: Driver) -> None:
        state, progress = Checkpoint(self.out / "checkpoint").read()
        engine.load_state_dict(state)
        if progress.get("round") != engine.round:
            raise ConfigError(f"{self.out / 'checkpoint'}: its files disagree on the round")
        self.rows = [_numbers(r) for r in progress["rows"] if r["round"] <= engine.round]
        self.totals = progress["totals"]
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
)


def _identity(config: ExperimentConfig) -> dict[str, Any]:
    """The experiment a checkpoint belongs to: its resolved config, less what may change."""
    identity = config.to_dict()
    for table, key in _RESUMABLE_CHANGES:
        identity.get(table, {}).pop(key, None)
    return identity


def check_resumable(config: ExperimentConfig, out: Path) -> None:
    """`--resume`'s checks, for an engine that must know before it starts: `out` holds a
    complete checkpoint of this experiment (else a one-line error)."""
    _can_resume(_identity(config), out, strict=True)


def _can_resume(identity: Mapping[str, Any], out: Path, strict: bool) -> bool:
    checkpoint = Checkpoint(out / "checkpoint")
    if not checkpoint.exists():
        if strict:
            raise ConfigError(f"--resume: {out} holds no complete checkpoint to resume from")
        return False
    try:
        # Resolved again, so a setting added to floral since the checkpoint takes its default.
        saved = _identity(resolve_config(checkpoint.identity()))
        _check_same_experiment(identity, saved, out)
    except ConfigError:
        if strict:
            raise
        return False
    return True


def _check_same_experiment(
    current: Mapping[str, Any], saved: Mapping[str, Any], out: Path
) -> None:
    for table in TABLES:
        here, there = current.get(table, {}), saved.get(table, {})
        for key in sorted(set(here) | set(there)):
            if here.get(key) != there.get(key):
                raise ConfigError(f"{table}.{key}: differs from the checkpoint's config in {out}")
    for key in ("seed",):
        if current.get(key) != saved.get(key):
            raise ConfigError(f"{key}: differs from the checkpoint's config in {out}")


def _start_afresh(out: Path, overwrite: bool) -> None:
    """An empty results folder, or one whose run files `overwrite` allows to replace."""
    found = [name for name in _RUN_FILES if (out / name).exists()]
    if found and not overwrite:
        what = "a finished run" if "summary.json" in found else "another run's results"
        raise ConfigError(
            f"{out} holds {what} ({', '.join(found)}): pass --overwrite to replace it, "
            "--resume to continue it, or --out to write elsewhere"
        )
    out.mkdir(parents=True, exist_ok=True)
    for name in found:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _write_config(config: ExperimentConfig, out: Path) -> None:
    atomic_write_text(out / "config.toml", tomli_w.dumps(config.to_dict()))
