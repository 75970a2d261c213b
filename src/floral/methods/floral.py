"""FLoRAL (Almansoori, Horváth, Takáč; arXiv 2410.03497).

Every adapted layer carries C LoRA adaptors, shared by all clients; each client mixes them with
a private router (one logit per adaptor). The base and the adaptors are global; adaptor c is
averaged with weights n_k * pi_kc. The client uploads the pi-weighted sums and the weights, so
the router itself never leaves the client.

With `shared_adaptor`, every layer holds one more adaptor, mixed in with weight 1 by every
client and so averaged with weights n_k: a frozen base's stand-in for the paper's trained
base, where what all clients share is learned once (`floral-seeded` builds on it).

Under differential privacy (`train.dp_clip`, `mixture_mean`) the weights are private too:
n_k * pi_kc would tell the server each client's router (central mode) and their sums its
clusters' sizes. So a client's update is taken as the vector (base deltas, pi_kc times adaptor
c's deltas), the pi_kc in [0, 1] acting as bounded factors; that whole vector is clipped to
`dp_clip`, so one client moves the noised sum by at most `dp_clip` in L2 norm, whatever its
router; and the server divides every tensor by the public number K of clients, not by the
weight sums (`floral.methods.base.private_upload`, docs/privacy.md). Adaptor c then moves by
the pi-weighted mean over all K clients: its usage share of FLoRAL's own step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar, cast

import torch
from torch import nn

from floral.adapters import Router, RouterSpec, attach, mixture_weights
from floral.adapters.attach import adaptor_table
from floral.adapters.stacked import stacked_mixture_weights
from floral.config import Range
from floral.data import ClientData, FederatedTask
from floral.errors import ConfigError
from floral.methods.adaptor_options import (
    AdaptorOptions,
    adapter_spec,
    adaptor_param_groups,
    freeze_base,
    frozen_base_roles,
    precondition_hook,
)
from floral.methods.base import WEIGHT_SUFFIX, Method, Role
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

__all__ = ["Floral", "FloralOptions", "learned_weights", "routed_names"]


@dataclass
class FloralOptions(AdaptorOptions):
    num_adaptors: int = 0  # C; 0 means one per cluster of the task
    router: RouterMode = "learned"  # oracle: fixed one-hot on the client's true cluster
    per_layer_router: bool = False
    temperature: float = 1.0
    noise: float = 1.0  # train-time router noise, uniform in [0, noise)
    # One more adaptor, always on (weight 1) and averaged over every client, for what all
    # clients share; the routed adaptors then differ by what sets the clusters apart.
    shared_adaptor: bool = False
    precondition: bool = True
    train_base: bool = True  # false: the base is frozen; only adaptors and routers train

    RANGES: ClassVar[dict[str, Range]] = {
        "num_adaptors": Range("[2, inf)", zero="one per cluster"),
        "temperature": Range("(0, inf)"),
        "noise": Range("[0, inf)"),
    }


class Floral(Method):
    name = "floral"
    description = "C shared LoRA adaptors per layer mixed by a private per-client router."
    Options = FloralOptions
    # Differential privacy may stand in for the mean (floral.engines.aggregation): the
    # weights per adaptor are n_k times the mixture pi_k, and the server takes the weighted
    # mean of the uploads, so `private_upload` clips the pi-weighted update.
    batchable = True
    plain_mean = False  # each adaptor is weighted by n_k * pi_kc
    mixture_mean = True
    secure_sum = True

    def build_model(self, model: nn.Module, task: FederatedTask) -> nn.Module:
        opts: FloralOptions = self.options
        check_router_mode(opts.router)
        num_adaptors = opts.num_adaptors or task.num_clusters
        if num_adaptors < 2:
            raise ConfigError(f"method.num_adaptors: FLoRAL needs at least 2, got {num_adaptors}")
        router = RouterSpec(
            opts.per_layer_router, opts.temperature, opts.noise, opts.shared_adaptor
        )
        attach(model, adapter_spec(replace(opts, rank=self.attached_rank), num_adaptors, router))
        freeze_base(model, opts.train_base)
        if self.fixed_router:
            prepare_oracle(cast(Router, model.floral_router))  # attach added it
        return model

    @property
    def attached_rank(self) -> int | float:
        """The adaptors' rank when the model is built (a subclass may start larger)."""
        return self.options.rank

    @property
    def oracle(self) -> bool:
        return self.options.router == "oracle"

    @property
    def fixed_router(self) -> bool:
        """Whether pi is set rather than trained: the private state is the fixed weights."""
        return self.oracle

    def roles(self, model: nn.Module) -> dict[str, Role]:
        roles = router_roles(super().roles(model), self.fixed_router)
        return frozen_base_roles(model, roles, self.options.train_base)

    def init_private(self, initial: TensorDict, client: ClientData) -> TensorDict:
        private = super().init_private(initial, client)
        return oracle_private(private, client.cluster) if self.oracle else private

    def router_weights(self, private: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        return None if self.oracle else learned_weights(private, self.options.temperature)

    def param_groups(self, model: nn.Module, config: TrainConfig) -> list[dict]:
        return adaptor_param_groups(model, config, ROUTER_PREFIX)

    def backward_hook(self, model: nn.Module) -> Callable[[], None] | None:
        return precondition_hook(self.options, model)

    def upload_weights(self, model: nn.Module, global_names: Sequence[str], n: int) -> TensorDict:
        weights = super().upload_weights(model, global_names, n)
        global_set, ndims = set(global_names), adaptor_table(model).ndims
        for name, pi in mixture_weights(model).items():
            if name in global_set:
                weights[name] = (n * pi).reshape((-1,) + (1,) * (ndims[name] - 1))
        return weights

    def batch_upload_weights(
        self, model: nn.Module, global_names: Sequence[str], n: int, stacked: TensorDict,
        clients: int,
    ) -> TensorDict | None:
        weights = super().batch_upload_weights(model, global_names, n, stacked, clients)
        pis = stacked_mixture_weights(model, stacked, clients)
        if weights is None or pis is None:
            return None
        global_set, ndims = set(global_names), adaptor_table(model).ndims
        for name, pi in pis.items():
            if name in global_set:  # (K, C) -> (K, C, 1, ...), as `upload_weights` per row
                weights[name] = (n * pi).reshape((clients, -1) + (1,) * (ndims[name] - 1))
        return weights


def routed_names(upload: Mapping[str, torch.Tensor]) -> list[str]:
    """The adaptor tensors of an upload: those with one weight per adaptor."""
    return [
        name[: -len(WEIGHT_SUFFIX)]
        for name, weight in upload.items()
        if name.endswith(WEIGHT_SUFFIX) and weight.numel() > 1
    ]


def learned_weights(
    private: Mapping[str, torch.Tensor], temperature: float = 1.0
) -> torch.Tensor | None:
    """pi (C,) of a learned router's private logits, without noise; a per-layer router's rows
    are averaged (one cluster per client, whatever the layer)."""
    logits = private.get(ROUTER_PREFIX + "logits")
    if logits is None:
        return None
    pi = torch.softmax(logits.detach() / temperature, dim=-1)
    return pi.mean(dim=0) if pi.dim() == 2 else pi
