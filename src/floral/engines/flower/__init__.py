"""Run floral methods on Flower: simulation, or a real SuperLink with SuperNodes.

    floral run configs/synthetic-mlp.toml --engine flower       # a Flower simulation
    flwr run examples/flower-app <connection>                   # a deployment (docs/deploy.md)

The engine knows no particular method: its ServerApp (`server.FlowerServer`) samples clients,
sends the global tensors and calls the method's `server_update` on checked uploads, exactly as
the local engine does; its ClientApp (`client.client_app`) runs the method's `client_step` on
its node's partition and keeps the private tensors in `context.state`. Flower (`flwr`) is an
optional dependency: only this package imports it, and only when a Flower run starts.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from floral.engines.flower.options import (
    FlowerOptions,
    experiment_from_run_config,
    options_from_run_config,
)
from floral.errors import ConfigError

if TYPE_CHECKING:
    from floral.experiment import ExperimentConfig, RunSummary

__all__ = [
    "FlowerOptions",
    "experiment_from_run_config",
    "options_from_run_config",
    "require_flower",
    "simulate",
]


def require_flower(simulation: bool = True) -> None:
    """A one-line error naming the extra when Flower (or its simulation backend) is missing."""
    needed = ("flwr", "ray") if simulation else ("flwr",)
    if any(importlib.util.find_spec(name) is None for name in needed):
        raise ConfigError("engine 'flower' needs Flower: pip install 'floral[flower]'")


def simulate(config: ExperimentConfig, out: Path, **kwargs: Any) -> RunSummary:
    """Run an experiment as a Flower simulation; see `simulation.simulate`."""
    require_flower()
    from floral.engines.flower.simulation import simulate as run  # imports flwr

    return run(config, out, **kwargs)
