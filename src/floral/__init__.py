"""floral: federated, personalized low-rank adaptation.

A method is a description (which tensors are global, private or frozen, how a client trains,
how the server combines what it gets); an engine runs it.

    from floral import AdapterSpec, attach, get_method, LocalEngine, load_config, run_experiment

The names below load their modules on first use, so `import floral` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AdapterSpec": "floral.adapters",
    "RouterSpec": "floral.adapters",
    "attach": "floral.adapters",
    "merge": "floral.adapters",
    "get_method": "floral.methods",
    "method_names": "floral.methods",
    "LocalEngine": "floral.engines.local",
    "ClientData": "floral.data",
    "FederatedTask": "floral.data",
    "TaskConfig": "floral.data",
    "build_task": "floral.data",
    "TrainConfig": "floral.train",
    "load_config": "floral.experiment",
    "run_experiment": "floral.run",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'floral' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
