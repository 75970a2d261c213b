"""Make a model adaptable: C shared low-rank adaptors per layer, mixed by a private router.

`attach` wraps the selected layers of a model, `merge` folds the mixture back into a plain
model, and the name helpers tell which parameters are adaptors and which are the router.
This package knows nothing of federation.
"""

from floral.adapters.attach import (
    adaptor_parameter_names,
    attach,
    merge,
    mixture_weights,
    router_parameter_names,
)
from floral.adapters.precondition import precondition_
from floral.adapters.rank import resolve_rank
from floral.adapters.router import Router
from floral.adapters.spec import AdapterSpec, RouterSpec

__all__ = [
    "AdapterSpec",
    "RouterSpec",
    "Router",
    "attach",
    "merge",
    "adaptor_parameter_names",
    "router_parameter_names",
    "mixture_weights",
    "precondition_",
    "resolve_rank",
]
