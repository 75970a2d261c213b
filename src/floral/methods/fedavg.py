"""FedAvg (McMahan et al., 2017): one global model, examples-weighted mean."""

from __future__ import annotations

from floral.methods.base import Method

__all__ = ["FedAvg"]


class FedAvg(Method):
    name = "fedavg"
    description = "Federated averaging of the whole model, weighted by examples."
    batchable = True
    plain_mean = True
    mixture_mean = False
    secure_sum = True
