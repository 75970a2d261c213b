"""floral: federated, personalized low-rank adaptation.

A method is a description (which tensors are global, private or frozen, how a client trains,
how the server combines what it gets); an engine runs it. Start with `floral.methods.get_method`
and `floral.engines.local.LocalEngine`, or the `floral` command.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
