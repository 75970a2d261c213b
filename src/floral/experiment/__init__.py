"""An experiment: a TOML file in, a results folder out.

- `floral.experiment.config`: the settings, read and checked before any work;
- `floral.experiment.setup`: the method, data, model and engine they describe;
- `floral.experiment.record`: the results folder, written by observers of the round loop.

floral.run.run_experiment picks the engine.
"""

from floral.experiment.config import (
    TABLES,
    ExperimentConfig,
    OutputConfig,
    check_name,
    check_values,
    load_config,
    placement_of,
    read_experiment,
    resolve_config,
)
from floral.experiment.record import (
    TASK_FILE,
    ProgressFn,
    RunSummary,
    check_resumable,
    resumes,
    run_rounds,
)
from floral.experiment.setup import build_engine, build_setup, quantize_base

__all__ = [
    "TABLES",
    "TASK_FILE",
    "ExperimentConfig",
    "OutputConfig",
    "ProgressFn",
    "RunSummary",
    "build_engine",
    "build_setup",
    "check_name",
    "check_resumable",
    "resumes",
    "check_values",
    "load_config",
    "placement_of",
    "quantize_base",
    "read_experiment",
    "resolve_config",
    "run_rounds",
]
