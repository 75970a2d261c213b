"""Experiment trackers: every metrics row of a run, as it is written, sent to TensorBoard and
MLflow too (`[output] tensorboard = true`, `mlflow = true`).

TensorBoard's event files go to `<results>/tensorboard/`; MLflow logs to its tracking URI
(`MLFLOW_TRACKING_URI`, else a SQLite file `<results>/mlflow.db`), one MLflow run per floral
run, with the resolved config as its parameters. Each evaluated round logs the row's numbers
(the headline metrics first: chrF and exact match where the clients generate text, then
accuracy, MSE or perplexity; loss, per cluster, router ARI, bytes, seconds) at its round, round
0 (the model before training: for a language model, the frozen base) included, and, where the
engine holds them, each client's router weights (`router/client<k>/adaptor<c>`).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import torch

from floral.errors import ConfigError

__all__ = ["Sink", "Sinks", "check_sinks", "flat_params", "open_sinks"]

_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow-skinny")}


class Sink(Protocol):
    def log(self, round_: int, values: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class Sinks:
    """All the trackers of one run; logging to none costs nothing."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def log(self, round_: int, row: Mapping[str, float],
            routers: Mapping[int, torch.Tensor] | None = None) -> None:
        if not self.sinks:
            return
        values = {k: float(v) for k, v in row.items() if k != "round"}
        for client, pi in (routers or {}).items():
            flat = pi.reshape(-1, pi.shape[-1]).mean(0)  # a per-layer router: its mean row
            values.update({f"router/client{client}/adaptor{c}": float(w)
                           for c, w in enumerate(flat)})
        for sink in self.sinks:
            sink.log(round_, values)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def open_sinks(tensorboard: bool, mlflow: bool, out: Path, name: str,
               params: Mapping[str, Any]) -> Sinks:
    """The trackers the `[output]` table asks for; a missing package is a one-line error."""
    sinks: list[Sink] = []
    if tensorboard:
        sinks.append(_TensorBoard(out / "tensorboard"))
    if mlflow:
        sinks.append(_MLflow(out, name, params))
    return Sinks(sinks)


class _TensorBoard:
    def __init__(self, folder: Path) -> None:
        module = _require("torch.utils.tensorboard", "tensorboard", "output.tensorboard")
        self.writer = module.SummaryWriter(log_dir=str(folder))

    def log(self, round_: int, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, round_)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, out: Path, name: str, params: Mapping[str, Any]) -> None:
        self.mlflow = _require("mlflow", "mlflow-skinny", "output.mlflow")
        # mlflow's own INFO lines (creating its database tables) are not the user's business.
        # Its import sets its loggers' levels (to MLFLOW_LOGGING_LEVEL, INFO by default), so
        # this comes after it.
        for logger in ("mlflow", "alembic"):
            if logging.getLogger(logger).getEffectiveLevel() < logging.WARNING:
                logging.getLogger(logger).setLevel(logging.WARNING)
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out.resolve() / 'mlflow.db'}"
        self.mlflow.set_tracking_uri(uri)
        self.run = self.mlflow.start_run(run_name=name)
        self.mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def log(self, round_: int, values: Mapping[str, float]) -> None:
        finite = {k: v for k, v in values.items() if v == v}  # MLflow refuses NaN
        self.mlflow.log_metrics(finite, step=round_)

    def close(self) -> None:
        self.mlflow.end_run()


def check_sinks(tensorboard: bool, mlflow: bool) -> None:
    """Before any work: the packages the asked trackers need are installed."""
    for key, asked in (("tensorboard", tensorboard), ("mlflow", mlflow)):
        module, package = _PACKAGES[key]
        if asked and importlib.util.find_spec(module) is None:
            raise ConfigError(f"output.{key}: needs {package}: pip install {package}")


def _require(module: str, package: str, key: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{key}: needs {package}: pip install {package}") from None


def flat_params(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys, as trackers show parameters."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flat_params(value, name + "."))
        else:
            flat[name] = value
    return flat
