"""Engines run methods: one round driver over transports, `local` in one process (the default)
and Flower (floral.engines.flower) for real federations; one client worker behind both, and
aggregation policies the driver calls.

The names below load their modules on first use, so that importing a module of this package
that needs no PyTorch (the Flower engine's options and mods, which the thin ClientApp of a
deployment imports: floral.flower_client) loads none.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from floral.engines.aggregation import Aggregation, aggregation_for
    from floral.engines.config import EngineConfig
    from floral.engines.driver import Driver, Observer, RoundResult, Transport
    from floral.engines.local import LocalEngine, LocalTransport
    from floral.engines.worker import ClientWorker, WorkerSettings

_EXPORTS = {
    "Aggregation": "floral.engines.aggregation",
    "aggregation_for": "floral.engines.aggregation",
    "ClientWorker": "floral.engines.worker",
    "WorkerSettings": "floral.engines.worker",
    "Driver": "floral.engines.driver",
    "Observer": "floral.engines.driver",
    "RoundResult": "floral.engines.driver",
    "Transport": "floral.engines.driver",
    "EngineConfig": "floral.engines.config",
    "LocalEngine": "floral.engines.local",
    "LocalTransport": "floral.engines.local",
}

__all__ = [
    "Aggregation",
    "ClientWorker",
    "Driver",
    "EngineConfig",
    "LocalEngine",
    "LocalTransport",
    "Observer",
    "RoundResult",
    "Transport",
    "WorkerSettings",
    "aggregation_for",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'floral.engines' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
