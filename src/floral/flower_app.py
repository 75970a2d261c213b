"""floral's Flower apps: the ServerApp and ClientApp of an experiment, and its simulation.

    [tool.flwr.app.components]
    serverapp = "floral.flower_app:server_app"
    clientapp = "floral.flower_app:client_app"       # or floral.flower_client's, thin

The engine parts (floral.engines.flower) know no experiment: the ServerApp here resolves the run
config into an experiment and drives the round driver over a `FlowerTransport`; the ClientApp
rebuilds a client's runtime from the experiment text every message carries. `simulate` runs an
experiment as a Flower simulation (ServerApp in this process, one virtual SuperNode per client
in Ray), each virtual node's config naming its partition, exactly as on a real deployment; the
virtual nodes keep their clients' private state under the results folder (`nodes/`), so a
simulation resumes from its checkpoint as exactly as a local run.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import tomli_w
from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from floral.checkpoint import atomic_write_text
from floral.comm import build_codec
from floral.config import tomllib
from floral.data import FederatedTask, build_task
from floral.engines.aggregation import aggregation_for
from floral.engines.driver import Driver, RoundResult
from floral.engines.flower.client import ClientRuntime, make_client_app
from floral.engines.flower.node_data import NodeData, node_task
from floral.engines.flower.options import (
    FlowerOptions,
    experiment_from_run_config,
    options_from_run_config,
)
from floral.engines.flower.server import FlowerTransport, log
from floral.engines.flower.task_cache import cached_task
from floral.engines.worker import ClientWorker, WorkerSettings
from floral.errors import DivergedError, FloralError, RoundFailedError
from floral.experiment import (
    ExperimentConfig,
    ProgressFn,
    RunSummary,
    build_setup,
    check_resumable,
    placement_of,
    resolve_config,
    run_rounds,
)
from floral.train.headline import GENERATION_METRICS
from floral.train.objective import get_objective

__all__ = ["NODES_FILE", "client_app", "experiment_text", "log_round", "runtime_for", "serve",
           "server_app", "simulate", "write_nodes"]

NODES_FILE = "nodes.json"  # in the results folder: each client's node and data digest


def experiment_text(config: ExperimentConfig) -> str:
    """The experiment as the server sends it: the resolved config, as TOML."""
    return tomli_w.dumps(config.to_dict())


def runtime_for(
    text: str, device: str = "", data: NodeData | None = None, cache: Path | None = None
) -> ClientRuntime:
    """A client's runtime from the experiment text: the local engine's model, method and data,
    on `device` (a node's own choice; "" = the experiment's `engine.device`); with `data`, the
    task holds only the node's own client, read from its folder. With `cache`, a folder, the
    built task is kept there for the next process (floral.engines.flower.task_cache)."""
    config = resolve_config(tomllib.loads(text))
    placement = placement_of(config, device)

    def build() -> FederatedTask:
        if data is None:
            return build_task(config.task, config.seed)
        return node_task(config.task, config.seed, data)

    own = build() if cache is None else cached_task(cache, config.task, config.seed, data, build)
    method, task, model = build_setup(config, own)
    # The local engine's own worker, so a node starts from and computes exactly its numbers.
    settings = WorkerSettings(placement, config.engine.threads, config.engine.batch_clients,
                              config.attack)
    worker = ClientWorker(method, task, model, config.train, config.seed, settings)
    return ClientRuntime(
        worker, build_codec(config.comm.download, "comm.download"),
        build_codec(config.comm.upload, "comm.upload"), config.engine.checkpoint_every,
    )


client_app = make_client_app(runtime_for)


def serve(
    grid: Grid,
    config: ExperimentConfig,
    out: Path,
    options: FlowerOptions | None = None,
    on_round: ProgressFn | None = None,
    overwrite: bool = False,
    resume: bool | str = False,
    task: FederatedTask | None = None,
) -> RunSummary:
    """Run `config` over the grid's nodes, writing the usual results folder to `out`;
    `resume` as for `run_rounds` (the nodes must keep their private state on disk); `task`,
    where the server built it (a simulation), gives the folder its outline (`task.json`)."""
    method = config.build_method()
    transport = FlowerTransport(grid, experiment_text(config), config.task.num_clients, options)
    driver = Driver(
        method, transport, transport.initial, get_objective(transport.kind),
        config.task.num_clients, config.train, config.engine, config.comm, config.seed, log,
    )
    try:
        summary = run_rounds(
            driver, config, out, resume=resume, overwrite=overwrite, on_round=on_round,
            task=task,
        )
    except (RoundFailedError, DivergedError):  # raised by rounds: the folder is this run's
        write_nodes(out, transport)
        raise
    write_nodes(out, transport)
    return summary


def write_nodes(out: Path, transport: FlowerTransport) -> None:
    """`nodes.json` in the results folder: each client's node and the digest of its data (never
    the data), and the nodes left out with why."""
    clients = [
        {"partition_id": k, "node_id": info.node_id, "cluster": info.cluster,
         "data_digest": info.data_digest, "private_store": info.store}
        for k, info in sorted(transport.nodes.items())
    ]
    left_out = [{"node_id": n, "reason": why} for n, why in sorted(transport.left_out.items())]
    text = json.dumps({"clients": clients, "left_out": left_out}, indent=2)
    atomic_write_text(out / NODES_FILE, text + "\n")


_SHOWN = ("accuracy", "mse", "perplexity", "loss", "router_ari")  # after the generation ones


def log_round(result: RoundResult, latest: Mapping[str, float]) -> None:
    """One line per round: the updates applied of those sampled, each dropped client and why."""
    shown = {k: round(latest[k], 4) for k in (*GENERATION_METRICS, *_SHOWN) if k in latest}
    suffix = f" {shown}" if result.eval else ""
    sampled = result.applied + len(result.dropped)
    left = "".join(f"; dropped client {k}: {why}" for k, why in result.dropped.items())
    log.info("round %d: %d of %d updates applied%s, train loss %.4f%s", result.round,
             result.applied, sampled, left, result.train_loss, suffix)


server_app = ServerApp()


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    data, overrides = experiment_from_run_config(context.run_config)
    config = resolve_config(data, [*overrides, "engine.name=flower"])
    out = Path(config.output.dir or Path("results") / config.name).absolute()
    options = options_from_run_config(context.run_config)
    summary = serve(grid, config, out, options, log_round, resume=options.resume)
    lead = summary.headline[0]
    log.info("%s: final %s = %.4f; results in %s", config.name, lead, summary.final[lead], out)


# -- simulation -----------------------------------------------------------------------------------
def simulate(
    config: ExperimentConfig,
    out: Path,
    *,
    resume: bool | str = False,
    overwrite: bool = False,
    on_round: ProgressFn | None = None,
    options: FlowerOptions | None = None,
    app: ClientApp | None = None,
    verbose: bool = False,
) -> RunSummary:
    """Run `config` as a Flower simulation with one virtual SuperNode per client.

    The virtual nodes keep their clients' private state in `out/nodes`, so `resume` continues
    from the folder's checkpoint exactly as the local engine does. `app` replaces floral's
    ClientApp (tests inject faults).
    """
    from flwr.simulation import run_simulation  # Ray: imported by simulations only

    out = Path(out).absolute()  # the virtual nodes run in other processes
    _, task, _ = build_setup(config)  # bad data settings stop here, before Ray starts
    # What the driver will refuse, refused before Ray starts.
    aggregation_for(config.train, config.build_method(), config.task.num_clients,
                    config.comm.upload, secure=(options or FlowerOptions()).secagg)
    if resume is True:
        check_resumable(config, out)  # likewise a missing or foreign checkpoint
    results: list[RunSummary] = []
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        results.append(serve(grid, config, out, options, on_round, overwrite, resume, task))

    with _quiet_flower(verbose), _kept_environment("PYTHONPATH"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # Ray's notices about its own future
        run_simulation(
            server,
            app or make_client_app(runtime_for, out / "nodes"),
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
