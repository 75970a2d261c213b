"""An experiment's settings: a TOML file in, a checked `ExperimentConfig` out.

    name = "mnist5k-label-shift"
    seed = 0
    [task]    dataset, shift, clients, clusters       (floral.data.TaskConfig)
    [model]   name, hidden                            (floral.models.ModelConfig)
    [method]  name, then that method's own options    (floral.methods)
    [train]   rounds, sampling, local SGD, server     (floral.train.TrainConfig)
    [engine]  name, evaluation, checkpoints           (floral.engines.EngineConfig)
    [comm]    download and upload codecs              (floral.comm.CommConfig)
    [output]  dir
    [attack]  experiments: clients that misbehave     (floral.engines.attack)

Every key and value is checked here, before any work: one line naming the key.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from floral.comm import CommConfig, build_codec
from floral.config import (
    Range,
    check_ranges,
    from_dict,
    parse_value,
    set_dotted,
    to_dict,
    tomllib,
)
from floral.data import TaskConfig
from floral.data.task import validate_task
from floral.engines.aggregation import aggregation_for, robustness_warning
from floral.engines.attack import AttackConfig, attackers, check_attack
from floral.engines.config import EngineConfig, check_engine_config
from floral.engines.driver import check_round_minimum
from floral.errors import ConfigError
from floral.experiment.paths import absolute_paths, resolve_paths
from floral.methods import Method, check_method_switch, get_method
from floral.models import ModelConfig
from floral.models.quantize import check_quantize
from floral.tracking import check_sinks
from floral.train.device import Placement, check_dtype, resolve_device
from floral.train.loop import TrainConfig, check_local_optimizer, check_settings_take_effect

__all__ = [
    "TABLES",
    "ExperimentConfig",
    "OutputConfig",
    "check_name",
    "check_values",
    "load_config",
    "placement_of",
    "read_experiment",
    "resolve_config",
]

TABLES = ("task", "model", "method", "train", "engine", "comm", "output", "attack")
log = logging.getLogger("floral")


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
    attack: AttackConfig = field(default_factory=AttackConfig)  # experiments on robustness

    RANGES: ClassVar[dict[str, Range]] = {"seed": Range("[0, 2**64)")}

    @property
    def method_name(self) -> str:
        return self.method["name"]

    def build_method(self) -> Method:
        options = {k: v for k, v in self.method.items() if k != "name"}
        return get_method(self.method_name, options)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read an experiment file, apply `key=value` overrides, and check everything; every path
    it names is absolute (floral.experiment.paths)."""
    config = resolve_config(read_experiment(path), overrides)
    absolute_paths(config)  # those set by the overrides: relative to the current folder
    return config


def read_experiment(path: str | os.PathLike) -> dict[str, Any]:
    """The raw tables of an experiment file; `name` defaults to the file's stem, and relative
    paths are made absolute against the file's folder (floral.experiment.paths)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such experiment file") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error})") from None
    data.setdefault("name", path.stem)
    return resolve_paths(data, path.parent)


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
    before = data.get("method")
    if isinstance(before, Mapping) and isinstance(before.get("name"), str):
        check_method_switch(before["name"], method)  # switched by an override
    config.build_method()  # checks the method's name and options now, before any work
    check_values(config)
    return config


def check_values(config: ExperimentConfig) -> None:
    """Value checks that do not need the data (the data checks its own when loaded): every
    numeric setting within the range declared beside it (`RANGES`, floral.config.check_ranges),
    the method's options included, then the checks across settings."""
    check_name(config.name)
    method = config.build_method()
    check_ranges(config, "")
    check_ranges(method.options, "method")
    check_local_optimizer(config.train)
    check_settings_take_effect(config.train)
    method.check_against(config.train, config.task)
    check_sinks(config.output.tensorboard, config.output.mlflow)
    check_engine_config(config.engine)
    placement = placement_of(config)  # an unknown device or a precision it cannot run stops here
    check_quantize(config.model.quantize, placement.device)
    policy = aggregation_for(config.train, method, config.task.num_clients, config.comm.upload)
    check_attack(config.attack)
    bad = len(attackers(config.attack, config.task.num_clients, config.seed))
    sampled = max(1, round(config.train.clients_per_round * config.task.num_clients))
    warning = robustness_warning(policy, sampled, bad)
    if warning:
        log.warning(warning)
    check_round_minimum(config.engine, config.train, config.task.num_clients)
    build_codec(config.comm.download, "comm.download")
    build_codec(config.comm.upload, "comm.upload")
    validate_task(config.task)  # the dataset's own checks, before any file is read


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_name(name: object, key: str = "name") -> None:
    """A run's name is a name, not a path: it becomes one folder under results/."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(
            f"{key}: {name!r} is not a name (letters, digits, '.', '-' and '_', beginning with "
            "a letter or digit; it becomes a folder under results/)"
        )


def placement_of(config: ExperimentConfig, device: str = "") -> Placement:
    """Where and how clients train: `engine.device` (or `device`, a node's own choice),
    `model.dtype` and `engine.compile`, checked against this machine."""
    key = "engine.device" if not device else "device"
    target = resolve_device(device or config.engine.device, key)
    return Placement(target, check_dtype(config.model.dtype, target), config.engine.compile)


