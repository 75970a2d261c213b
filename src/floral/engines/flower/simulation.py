"""`engine = "flower"`: a Flower simulation of an experiment (ServerApp here, clients in Ray).

The ServerApp runs in this process and writes the results folder itself; each client is a
virtual SuperNode whose node config names its partition, exactly as on a real deployment.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from floral.engines.flower.client import client_app as floral_client_app
from floral.engines.flower.options import RESUME_UNAVAILABLE, FlowerOptions
from floral.engines.flower.server import serve
from floral.errors import ConfigError, FloralError
from floral.experiment import ExperimentConfig, ProgressFn, RunSummary, build_setup

__all__ = ["simulate"]


def simulate(
    config: ExperimentConfig,
    out: Path,
    *,
    resume: bool | str = False,
    on_round: ProgressFn | None = None,
    options: FlowerOptions | None = None,
    client_app: ClientApp | None = None,
    verbose: bool = False,
) -> RunSummary:
    """Run `config` as a Flower simulation with one virtual SuperNode per client.

    `resume="auto"` starts afresh: the clients' private state lived in the previous simulation's
    nodes and ended with it. `client_app` replaces floral's ClientApp (tests inject faults).
    """
    if resume is True:
        raise ConfigError(RESUME_UNAVAILABLE)
    build_setup(config)  # bad data settings stop here, before Ray starts or anything is written
    results: list[RunSummary] = []
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        results.append(serve(grid, config, out, options, on_round))

    with _quiet_flower(verbose), _kept_environment("PYTHONPATH"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # Ray's notices about its own future
        run_simulation(
            server,
            client_app or floral_client_app,
            num_supernodes=config.task.num_clients,
            backend_config=_backend_config(verbose),
        )
    if not results:
        raise FloralError("the Flower simulation ended without a result (see the log above)")
    return results[0]


def _backend_config(verbose: bool) -> dict:
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "logging_level": logging.INFO if verbose else logging.ERROR,
            "log_to_driver": verbose,
        },
    }


@contextmanager
def _quiet_flower(verbose: bool) -> Iterator[None]:
    """Flower's per-message chatter off (unless verbose); floral's warnings about replies on."""
    flower, ours = logging.getLogger("flwr"), logging.getLogger("flwr.floral")
    saved = flower.level, ours.level
    if not verbose:
        flower.setLevel(logging.ERROR)
        ours.setLevel(logging.WARNING)
    try:
        yield
    finally:
        flower.setLevel(saved[0])
        ours.setLevel(saved[1])


@contextmanager
def _kept_environment(name: str) -> Iterator[None]:
    """Flower's Ray backend rewrites an environment variable for its workers; put it back."""
    saved = os.environ.get(name)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved
