"""Run floral methods on Flower: simulation, or a real SuperLink with SuperNodes.

    floral run configs/synthetic-mlp.toml --engine flower       # a Flower simulation
    flwr run examples/flower-app <connection>                   # a deployment (docs/deploy.md)

The engine knows no particular method: `server.FlowerTransport` is a transport for the round
driver (floral.engines.driver), which samples clients, sends the global tensors and calls the
method's `server_update` on checked uploads exactly as for the local engine; the ClientApp
(`client.make_client_app`) runs the method's `client_step` on its node's partition and keeps the
private tensors in `context.state`. The apps themselves, which read experiments, are in
floral.flower_app. Flower (`flwr`) is an optional dependency: only this package and
floral.flower_app import it, and only when a Flower run starts.
"""

from __future__ import annotations

import importlib.util

from floral.engines.flower.options import (
    FlowerOptions,
    experiment_from_run_config,
    options_from_run_config,
)
from floral.errors import ConfigError

__all__ = [
    "FlowerOptions",
    "experiment_from_run_config",
    "options_from_run_config",
    "require_flower",
]


def require_flower(simulation: bool = True) -> None:
    """A one-line error naming the extra when Flower (or its simulation backend) is missing."""
    needed = ("flwr", "ray") if simulation else ("flwr",)
    if any(importlib.util.find_spec(name) is None for name in needed):
        raise ConfigError("engine 'flower' needs Flower: pip install 'floral-lora[flower]'")
