"""Engines run methods: one round driver over transports, `local` in one process (the default)
and Flower (floral.engines.flower) for real federations."""

from floral.engines.config import EngineConfig
from floral.engines.driver import Driver, RoundResult, Transport
from floral.engines.local import LocalEngine, LocalTransport

__all__ = ["Driver", "EngineConfig", "LocalEngine", "LocalTransport", "RoundResult", "Transport"]
