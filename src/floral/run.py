"""Run an experiment on the engine its config names: in this process, or a Flower simulation.

    from floral.run import run_experiment
    summary = run_experiment(load_config("configs/synthetic-mlp.toml"))
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from floral.checkpoint import check_writable
from floral.engines.flower import require_flower
from floral.engines.local import LocalEngine
from floral.experiment import ExperimentConfig, ProgressFn, RunSummary, build_engine, run_rounds

__all__ = ["ClientProgressFn", "run_experiment"]

# (stage, clients done, clients in the stage): stage is "train" or "evaluate".
ClientProgressFn = Callable[[str, int, int], None]


def run_experiment(
    config: ExperimentConfig,
    out_dir: str | os.PathLike | None = None,
    *,
    resume: bool | str = False,
    overwrite: bool = False,
    on_round: ProgressFn | None = None,
    on_client: ClientProgressFn | None = None,
) -> RunSummary:
    """Run an experiment to the end, writing the results folder as it goes.

    `resume=True` continues from the folder's checkpoint (an error if its config differs);
    `resume="auto"` continues only from a checkpoint of the same config, else starts afresh.
    Starting afresh where a run's results are needs `overwrite` (implied by "auto").
    `on_round` is called after every round; `on_client` (the engine in this process only) as
    each client of a round finishes training or evaluation.
    """
    out = Path(out_dir or config.output.dir or Path("results") / config.name)
    check_writable(out)  # a file in the way, or no permission, stops here, before any work
    if config.engine.name == "flower":
        require_flower()
        from floral.flower_app import simulate  # optional dependency, imported on use

        return simulate(config, out, resume=resume, overwrite=overwrite, on_round=on_round)
    engine, task = build_engine(config)  # bad data settings stop here, before any output
    if on_client is not None:
        report_clients(engine, on_client)
    return run_rounds(
        engine, config, out, resume=resume, overwrite=overwrite, on_round=on_round, task=task
    )


def report_clients(engine: LocalEngine, on_client: ClientProgressFn) -> None:
    """Have `engine` call `on_client` as each client finishes a step: its worker is asked for
    one client at a time (each client's step is a function of (seed, round, client) alone, so
    the numbers are those of one call for all), except where it trains clients together
    (`engine.batch_clients`), which is reported when the batch is done."""
    worker, transport = engine.worker, engine.local
    train, evaluate = worker.train, transport.evaluate

    def train_each(round_: int, global_state: Mapping[str, Any],
                   private: Mapping[int, Any]) -> dict[int, Any]:
        if worker.batch_clients:
            updates = train(round_, global_state, private)
            on_client("train", len(updates), len(private))
            return updates
        updates = {}
        for k, state in private.items():
            updates.update(train(round_, global_state, {k: state}))
            on_client("train", len(updates), len(private))
        return updates

    def evaluate_each(round_: int, clients: Sequence[int], global_state: Any) -> dict[int, Any]:
        replies: dict[int, Any] = {}
        for k in clients:
            replies.update(evaluate(round_, [k], global_state))
            on_client("evaluate", len(replies), len(clients))
        return replies

    # Instance attributes: this engine alone reports, and its classes stay as they are.
    setattr(worker, "train", train_each)  # noqa: B010
    setattr(transport, "evaluate", evaluate_each)  # noqa: B010
