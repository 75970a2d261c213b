"""Engines run methods: one round driver over transports, `local` in one process (the default)
and Flower (floral.engines.flower) for real federations; one client worker behind both, and
aggregation policies the driver calls."""

from floral.engines.aggregation import Aggregation, aggregation_for
from floral.engines.config import EngineConfig
from floral.engines.driver import Driver, Observer, RoundResult, Transport
from floral.engines.local import LocalEngine, LocalTransport
from floral.engines.worker import ClientWorker, WorkerSettings

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
