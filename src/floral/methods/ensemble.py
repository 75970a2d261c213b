"""Ensemble: C full models mixed by a private per-client router (FLoRAL's baseline).

The client's output is sum_c pi_c f_c(x); model c is averaged with weights n_k * pi_kc. With
the oracle router each client uses only the model of its true cluster (clustered FL with
known clusters).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, cast

import torch
from torch import nn

from floral.adapters import Router, RouterSpec
from floral.config import Range
from floral.data import ClientData, FederatedTask
from floral.errors import ConfigError
from floral.methods.base import Method, Role
from floral.methods.floral import learned_weights
from floral.methods.routing import (
    ROUTER_PREFIX,
    RouterMode,
    check_router_mode,
    oracle_private,
    prepare_oracle,
    router_roles,
)
from floral.train.loop import TrainConfig
from floral.train.state import TensorDict

__all__ = ["Ensemble", "EnsembleModel", "EnsembleOptions"]


@dataclass
class EnsembleOptions:
    num_models: int = 0  # C; 0 means one per cluster of the task
    router: RouterMode = "learned"
    temperature: float = 1.0
    noise: float = 1.0

    RANGES: ClassVar[dict[str, Range]] = {
        "num_models": Range("[2, inf)", zero="one per cluster"),
        "temperature": Range("(0, inf)"),
        "noise": Range("[0, inf)"),
    }


class EnsembleModel(nn.Module):
    """C independently initialized copies of a model, outputs mixed by a router."""

    def __init__(self, model: nn.Module, num_models: int, spec: RouterSpec) -> None:
        super().__init__()
        members = [model] + [copy.deepcopy(model) for _ in range(num_models - 1)]
        for member in members[1:]:
            for module in member.modules():
                reset = getattr(module, "reset_parameters", None)
                if reset is not None:
                    reset()
        self.members = nn.ModuleList(members)
        self.floral_router = Router(num_models, spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pi = self.floral_router.refresh()
        fixed = self.floral_router.fixed.numel() > 0
        out: torch.Tensor | None = None
        for c, member in enumerate(self.members):
            if fixed and pi[c] == 0:
                continue  # an oracle client never needs the other clusters' models
            term = pi[c] * member(x)
            out = term if out is None else out + term
        return cast(torch.Tensor, out)  # set: only members with pi_c = 0 are skipped


class Ensemble(Method):
    name = "ensemble"
    description = "C full models mixed by a private per-client router over their outputs."
    Options = EnsembleOptions
    batchable = True
    plain_mean = False  # each model is weighted by n_k * pi_kc
    mixture_mean = False
    secure_sum = True

    def build_model(self, model: nn.Module, task: FederatedTask) -> nn.Module:
        opts: EnsembleOptions = self.options
        check_router_mode(opts.router)
        num_models = opts.num_models or task.num_clusters
        if num_models < 2:
            raise ConfigError(f"method.num_models: an ensemble needs at least 2, got {num_models}")
        ensemble = EnsembleModel(model, num_models, RouterSpec(False, opts.temperature, opts.noise))
        if self.oracle:
            prepare_oracle(ensemble.floral_router)
        return ensemble

    @property
    def oracle(self) -> bool:
        return self.options.router == "oracle"

    def roles(self, model: nn.Module) -> dict[str, Role]:
        return router_roles(super().roles(model), self.oracle)

    def init_private(self, initial: TensorDict, client: ClientData) -> TensorDict:
        private = super().init_private(initial, client)
        return oracle_private(private, client.cluster) if self.oracle else private

    def router_weights(self, private: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        return None if self.oracle else learned_weights(private, self.options.temperature)

    def param_groups(self, model: nn.Module, config: TrainConfig) -> list[dict]:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return [
            {"params": [p for n, p in named if not n.startswith(ROUTER_PREFIX)], "lr": config.lr},
            {"params": [p for n, p in named if n.startswith(ROUTER_PREFIX)],
             "lr": config.router_lr},
        ]

    def batch_upload_weights(
        self, model: nn.Module, global_names: Sequence[str], n: int, stacked: TensorDict,
        clients: int,
    ) -> TensorDict | None:
        return None  # each client's pi comes from its router as loaded (`upload_weights`)

    def upload_weights(self, model: nn.Module, global_names: Sequence[str], n: int) -> TensorDict:
        with torch.no_grad():
            was_training = model.training
            model.eval()
            pi = cast(Router, model.floral_router).refresh()
            model.train(was_training)
        weights = {}
        for name in global_names:
            # "members.<c>.<rest>": model c's tensors are weighted by n * pi_c.
            parts = name.split(".")
            member = int(parts[1]) if parts[0] == "members" else None
            weights[name] = torch.tensor(float(n)) * (pi[member] if member is not None else 1.0)
        return weights
