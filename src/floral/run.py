"""Run an experiment on the engine its config names: in this process, or a Flower simulation.

    from floral.run import run_experiment
    summary = run_experiment(load_config("configs/synthetic-mlp.toml"))
"""

from __future__ import annotations

import os
from pathlib import Path

from floral.checkpoint import check_writable
from floral.engines.flower import require_flower
from floral.experiment import ExperimentConfig, ProgressFn, RunSummary, build_engine, run_rounds

__all__ = ["run_experiment"]


def run_experiment(
    config: ExperimentConfig,
    out_dir: str | os.PathLike | None = None,
    *,
    resume: bool | str = False,
    overwrite: bool = False,
    on_round: ProgressFn | None = None,
) -> RunSummary:
    """Run an experiment to the end, writing the results folder as it goes.

    `resume=True` continues from the folder's checkpoint (an error if its config differs);
    `resume="auto"` continues only from a checkpoint of the same config, else starts afresh.
    Starting afresh where a run's results are needs `overwrite` (implied by "auto").
    """
    out = Path(out_dir or config.output.dir or Path("results") / config.name)
    check_writable(out)  # a file in the way, or no permission, stops here, before any work
    if config.engine.name == "flower":
        require_flower()
        from floral.flower_app import simulate  # optional dependency, imported on use

        return simulate(config, out, resume=resume, overwrite=overwrite, on_round=on_round)
    engine, _ = build_engine(config)  # bad data settings stop here, before any output
    return run_rounds(
        engine, config, out, resume=resume, overwrite=overwrite, on_round=on_round
    )
