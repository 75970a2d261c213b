"""Shared by the Flower tests: a loopback Grid, a ClientApp that sends bad replies, configs,
the checks of a resumed run, and the example Flower app's experiment.

`LoopbackGrid` is Flower's `Grid` with every node's ClientApp called in this process on real
`Message`s, `RecordDict`s and per-node `Context`s: the engine's logic without Ray or a
SuperLink, fast enough to run every method. The real runtimes are covered by
tests/flower/test_flower_simulation.py (Ray) and tests/flower/test_flower_deployment.py
(SuperLink and SuperNodes).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from uuid import uuid4

import numpy as np
import torch
from flwr.app import Array, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.config import flatten_dict, parse_config_args
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

from floral.config import tomllib
from floral.engines.flower import experiment_from_run_config
from floral.engines.flower.options import FlowerOptions
from floral.engines.flower.records import UPLOAD
from floral.experiment import ExperimentConfig, ProgressFn, RunSummary, resolve_config
from floral.flower_app import client_app as floral_client_app
from floral.flower_app import serve
from floral.methods.base import WEIGHT_SUFFIX
from support import ROOT

__all__ = [
    "APP",
    "FAULTS",
    "LoopbackGrid",
    "Stop",
    "app_experiment",
    "assert_same_run",
    "faulty_client_app",
    "no_time",
    "run_loopback",
    "stop_after_round_3",
    "tiny_experiment",
]

APP = ROOT / "examples" / "flower-app"  # the example Flower app, as `flwr run` installs it


def tiny_experiment(method: str = "floral", **tables: dict[str, Any]) -> dict[str, Any]:
    """A synthetic-MLP experiment small enough for a few seconds on any engine."""
    data: dict[str, Any] = {
        "name": f"tiny-{method}",
        "seed": 7,
        "task": {"dataset": "synthetic-mlp", "shift": "none", "num_clients": 4,
                 "num_clusters": 2, "samples_per_client": 40},
        "model": {"name": "mlp", "hidden": [16]},
        "method": {"name": method},
        "train": {"rounds": 2, "clients_per_round": 0.75, "batch_size": 8, "lr": 0.05,
                  "router_lr": 0.5},
        # One by one: a Flower node trains one client per message, and the local engine takes
        # the same operations in the same order only one by one (batched, it agrees with
        # them to float rounding: test_flower_engine.py).
        "engine": {"eval_every": 1, "batch_clients": 0},
    }
    for table, values in tables.items():
        data[table] = {**data.get(table, {}), **values}
    return data


class LoopbackGrid(Grid):
    """Messages go straight to the ClientApp of their node; replies wait to be pulled."""

    def __init__(
        self,
        app: ClientApp,
        num_nodes: int,
        state_dir: Path | None = None,
        node_configs: Mapping[int, Mapping[str, Any]] | None = None,
    ) -> None:
        # Messages take their sender from the running task, as a Flower runtime sets it.
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.app = app
        self.contexts = {
            1000 + k: Context(
                run_id=1, node_id=1000 + k, state=RecordDict(), run_config={},
                node_config={"partition-id": k, "num-partitions": num_nodes},
            )
            for k in range(num_nodes)
        }
        if state_dir is not None:  # each node its own folder, as on separate machines
            for k, context in enumerate(self.contexts.values()):
                context.node_config["state-dir"] = str(state_dir / f"node{k}")
        for k, extra in (node_configs or {}).items():  # a node's own settings (data-path, ...)
            self.contexts[1000 + k].node_config.update(extra)
        self.traffic: list[Message] = []  # every message and reply, for inspection
        self._replies: dict[str, Message] = {}

    def set_run(self, run_id: Any) -> None:  # pragma: no cover - not used by floral
        raise NotImplementedError

    @property
    def run(self) -> Any:  # pragma: no cover - not used by floral
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid4().hex  # as Flower's grids do
            try:
                reply = self.app(message, self.contexts[message.metadata.dst_node_id])
            except Exception as error:  # as Flower's ClientApp runner answers a failed message
                reason = f"{type(error)}:<'{error}'>"
                reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason),
                                reply_to=message)
            self.traffic += [message, reply]
            self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, *args: Any, **kwargs: Any) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError


def run_loopback(
    config: ExperimentConfig,
    out: Path,
    app: ClientApp = floral_client_app,
    *,
    state_dir: Path | None = None,
    resume: bool | str = False,
    on_round: ProgressFn | None = None,
    node_configs: Mapping[int, Mapping[str, Any]] | None = None,
    options: FlowerOptions | None = None,
) -> tuple[RunSummary, LoopbackGrid]:
    """A run on fresh nodes (restarted ones, when `state_dir` holds their previous state)."""
    grid = LoopbackGrid(app, config.task.num_clients, state_dir, node_configs)
    options = options or FlowerOptions(round_timeout=5.0, node_timeout=1.0, poll_interval=0.001)
    return serve(grid, config, out, options, on_round, resume=resume), grid


# -- a ClientApp whose first clients send bad uploads ----------------------------------------------
FAULTS = {0: "wrong shape", 1: "NaN", 2: "missing key"}  # client -> what is wrong with its reply

faulty_client_app = ClientApp()


@faulty_client_app.query()
def _query(msg: Message, context: Context) -> Message:
    return floral_client_app(msg, context)


@faulty_client_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    return floral_client_app(msg, context)


@faulty_client_app.train()
def _train(msg: Message, context: Context) -> Message:
    reply = floral_client_app(msg, context)
    upload = reply.content[UPLOAD]
    name = next(n for n in upload if not n.endswith(WEIGHT_SUFFIX))
    fault = FAULTS.get(int(context.node_config["partition-id"]))
    if fault == "wrong shape":
        upload[name] = Array(np.zeros((3, 3), dtype=np.float32))
    elif fault == "NaN":
        values = upload[name].numpy().copy()
        values.flat[0] = np.nan
        upload[name] = Array(values)
    elif fault == "missing key":
        del upload[name]
    return reply


# -- a server that dies, and the run it resumes to ------------------------------------------------
class Stop(Exception):
    """The server dies after round 3, one round past its checkpoint."""


def stop_after_round_3(result: Any, latest: Any) -> None:
    """An `on_round` callback that stops the server once round 3 is done."""
    if result.round == 3:
        raise Stop


def no_time(row: Mapping[str, Any]) -> dict[str, Any]:
    """A metrics row without its seconds, NaN made comparable."""
    return {k: ("nan" if isinstance(v, float) and math.isnan(v) else v)
            for k, v in row.items() if k != "seconds"}


def assert_same_run(got_dir: Path, summary: RunSummary, want_dir: Path, want: RunSummary) -> None:
    """The same rows and the same global tensors as an uninterrupted run's."""
    assert [no_time(r) for r in summary.history] == [no_time(r) for r in want.history]
    expected = load_file(want_dir / "state.safetensors")
    got = load_file(got_dir / "state.safetensors")
    assert {k for k in got if not k.startswith("flower/")} == {
        k for k in expected if not k.startswith("private/")}
    for name, tensor in got.items():
        if not name.startswith("flower/"):
            assert torch.equal(tensor, expected[name]), name


# -- the example Flower app ------------------------------------------------------------------------
def app_experiment(run_config: str) -> ExperimentConfig:
    """The experiment `flwr run` of the example app runs with `--run-config run_config`."""
    app = tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    flat = {**flatten_dict(app), **parse_config_args([run_config])}
    data, overrides = experiment_from_run_config(flat)
    return resolve_config(data, overrides)
