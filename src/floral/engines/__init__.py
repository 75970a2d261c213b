"""Engines run methods: `local` in one process (the default); Flower for real federations."""

from floral.engines.local import EngineConfig, LocalEngine, RoundResult

__all__ = ["EngineConfig", "LocalEngine", "RoundResult"]
