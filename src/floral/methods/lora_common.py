"""What the federated-LoRA methods share: one LoRA adaptor per layer on a frozen base, a role
for each factor, ranks per client, and shape checks on what clients send.

The methods differ in the roles of the factors (FedIT: A and B global; FFA-LoRA: A frozen;
FedSA-LoRA: B private), in which base tensors are trained (FLoCoRA: head and norms), and in
aggregation (FLoRA stacks, HetLoRA zero-pads). Everything else is here.

Ranks per client: `ranks = [r_0, r_1, ...]` gives client k rank r_k (one per client), and
`rank_tiers = [2, 4, 8]` splits the client ids into that many contiguous blocks of equal size
(clients 0..K/3-1 get rank 2, and so on). Contiguous blocks, not `k mod T`, because clusters
are `k mod C`: with T = C every cluster would get a single rank. The model carries the largest
rank R; a client of rank r uses the first r ranks, the others held at zero.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from floral.adapters import adaptor_parameter_names, attach
from floral.config import Range
from floral.data import FederatedTask, TaskConfig
from floral.errors import ConfigError, FloralError
from floral.methods.adaptor_options import (
    AdaptorOptions,
    adapter_spec,
    adaptor_param_groups,
    precondition_hook,
)
from floral.methods.base import (
    WEIGHT_SUFFIX,
    Method,
    Role,
    ServerState,
    UploadBatch,
    weighted_mean_delta,
)
from floral.methods.checks import aggregation_problems, value_problems
from floral.train.loop import TrainConfig
from floral.train.optim import ServerOptimizer
from floral.train.state import TensorDict

__all__ = [
    "RANK_FACTORS",
    "LoraMethod",
    "LoraOptions",
    "UploadShapeError",
    "check_upload_shapes",
    "client_ranks",
    "first_ranks",
    "is_ranked",
    "local_name",
    "truncated",
]

RANK_FACTORS = ("lora_A", "lora_B")  # tensors with the rank on axis 1: (C, r, d...)


@dataclass
class LoraOptions(AdaptorOptions):
    rank: int | float = 8
    ranks: list[int] = field(default_factory=list)  # one rank per client id
    rank_tiers: list[int] = field(default_factory=list)  # ranks for contiguous blocks of ids

    RANGES: ClassVar[dict[str, Range]] = {
        "ranks": Range("[1, inf)"),
        "rank_tiers": Range("[1, inf)"),
    }


class UploadShapeError(FloralError):
    """A client sent a tensor whose shape does not fit the global model."""


def local_name(name: str) -> str:
    """`features.0.lora_A` -> `lora_A`."""
    return name.rpartition(".")[2]


def is_ranked(name: str) -> bool:
    return local_name(name) in RANK_FACTORS


def client_ranks(options: LoraOptions, num_clients: int) -> list[int]:
    """Each client's rank from `ranks` or `rank_tiers`; empty when neither is set."""
    if options.ranks and options.rank_tiers:
        raise ConfigError("method.ranks: give either ranks or rank_tiers, not both")
    key = "method.ranks" if options.ranks else "method.rank_tiers"
    values = options.ranks or options.rank_tiers
    if any(r < 1 for r in values):
        raise ConfigError(f"{key}: every rank must be at least 1, got {values}")
    if options.ranks and len(values) != num_clients:
        raise ConfigError(
            f"method.ranks: {len(values)} ranks for {num_clients} clients; give one per client "
            "or use method.rank_tiers"
        )
    if len(values) > num_clients:
        raise ConfigError(f"{key}: {len(values)} tiers for only {num_clients} clients")
    if not options.rank_tiers:
        return list(values)
    return [values[k * len(values) // num_clients] for k in range(num_clients)]


def truncated(state: Mapping[str, torch.Tensor], rank: int) -> TensorDict:
    """`state` with ranks `rank` and above of every factor set to zero (new tensors)."""
    out = dict(state)
    for name, tensor in state.items():
        if is_ranked(name) and tensor.shape[1] > rank:
            out[name] = tensor.clone()
            out[name][:, rank:] = 0.0
    return out


def first_ranks(tensors: Mapping[str, torch.Tensor], rank: int) -> TensorDict:
    """The first `rank` ranks of every factor; other tensors as they are."""
    return {n: t[:, :rank].clone() if is_ranked(n) else t for n, t in tensors.items()}


def check_upload_shapes(
    method: str,
    uploads: Sequence[Mapping[str, torch.Tensor]],
    expected: Mapping[str, torch.Size],
    ranked: bool = False,
) -> None:
    """Every uploaded tensor must have its global shape; with `ranked`, a factor may also
    hold fewer ranks (axis 1) than the global one. Weights are checked by the aggregation."""
    for index, upload in enumerate(uploads):
        for name, tensor in upload.items():
            if name.endswith(WEIGHT_SUFFIX):
                continue
            want = expected.get(name)
            if want is None:
                raise UploadShapeError(
                    f"{method}: upload {index + 1} of {len(uploads)} sent {name!r}, "
                    "which the global model does not have"
                )
            if not _fits(tuple(tensor.shape), tuple(want), ranked and is_ranked(name)):
                raise _shape_error(method, uploads, index, name, tuple(want), ranked)


def _fits(shape: tuple[int, ...], want: tuple[int, ...], ranked: bool) -> bool:
    if not ranked:
        return shape == want
    return (
        len(shape) == len(want)
        and 1 <= shape[1] <= want[1]
        and shape[:1] + shape[2:] == want[:1] + want[2:]
    )


def _shape_error(
    method: str,
    uploads: Sequence[Mapping[str, torch.Tensor]],
    index: int,
    name: str,
    want: tuple[int, ...],
    ranked: bool,
) -> UploadShapeError:
    if ranked and is_ranked(name):
        want_text = f"({want[0]}, r <= {want[1]}, {', '.join(map(str, want[2:]))})"
    else:
        want_text = str(want)
    sent = [tuple(u[name].shape) if name in u else None for u in uploads]
    return UploadShapeError(
        f"{method}: upload {index + 1} of {len(uploads)} sent {name} of shape "
        f"{tuple(uploads[index][name].shape)}, expected {want_text} (all uploads: {sent})"
    )


class LoraMethod(Method):
    """LoRA (one adaptor per layer) on a frozen base; all factors global unless a subclass
    gives a factor another role in `factor_roles`."""

    Options = LoraOptions
    factor_roles: ClassVar[Mapping[str, Role]] = {}
    ranked_uploads: ClassVar[bool] = False  # clients may send fewer ranks than the global model

    def __init__(self, options: LoraOptions | None = None) -> None:
        super().__init__(options)
        # Client id -> rank (empty: every client the full rank), from `ranks` or `rank_tiers`
        # and the federation's size, known when the model is built (as every client does).
        self.client_rank: list[int] = []

    def check_against(self, train: TrainConfig, task: TaskConfig) -> None:
        client_ranks(self.options, task.num_clients)

    def build_model(self, model: nn.Module, task: FederatedTask) -> nn.Module:
        ranks = client_ranks(self.options, len(task.clients))
        self.client_rank = ranks
        options = self.adaptor_options(model)
        if ranks:
            options = dataclasses.replace(options, rank=max(ranks))
        attach(model, adapter_spec(options, num_adaptors=1))
        self.set_trainable(model)
        return model

    def adaptor_options(self, model: nn.Module) -> AdaptorOptions:
        """The options `attach` gets; FLoCoRA keeps its head out of the adapted layers."""
        return self.options

    def rank_of(self, client_id: int) -> int | None:
        """The client's rank, or None when every client uses the model's full rank."""
        return self.client_rank[client_id] if self.client_rank else None

    # -- roles -------------------------------------------------------------------------------
    def roles(self, model: nn.Module) -> dict[str, Role]:
        roles = super().roles(model)
        # Every name of a tied parameter (an LM's output head and embedding), not just the first.
        parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        adaptors = set(adaptor_parameter_names(model))
        for name in roles:
            if name in adaptors:
                roles[name] = self.factor_roles.get(local_name(name), Role.GLOBAL)
            elif name in parameters:
                roles[name] = self.base_role(name)
        # Buffers (BatchNorm statistics) keep the default role: they change in training, so
        # they are averaged like FedAvg's rather than frozen.
        return roles

    def base_role(self, name: str) -> Role:
        """Role of a parameter of the base model; frozen unless a method trains it."""
        return Role.FROZEN

    def trains(self, name: str, role: Role, adaptor: bool) -> bool:
        """Whether local SGD updates this parameter."""
        return role is not Role.FROZEN

    def set_trainable(self, model: nn.Module) -> None:
        roles = self.roles(model)
        adaptors = set(adaptor_parameter_names(model))
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(self.trains(name, roles[name], name in adaptors))

    # -- the client step ---------------------------------------------------------------------
    def param_groups(self, model: nn.Module, config: TrainConfig) -> list[dict]:
        return adaptor_param_groups(model, config)

    def backward_hook(self, model: nn.Module) -> Callable[[], None] | None:
        return precondition_hook(self.options, model)

    # -- the server --------------------------------------------------------------------------
    def check_upload(self, state: ServerState, upload: Mapping[str, torch.Tensor]) -> list[str]:
        if not self.ranked_uploads:
            return super().check_upload(state, upload)
        # Ranks per client break the default contract (fewer ranks, or factors for deltas):
        # the upload is judged by this method's own aggregation, on it alone.
        return value_problems(upload) or aggregation_problems(self, state, upload)

    def check_upload_batch(self, state: ServerState, batch: UploadBatch) -> bool:
        # Ranked uploads are judged one by one, by this method's own aggregation.
        return not self.ranked_uploads and super().check_upload_batch(state, batch)

    def server_update(
        self,
        state: ServerState,
        uploads: Sequence[Mapping[str, torch.Tensor]],
        optimizer: ServerOptimizer,
    ) -> ServerState:
        """Check every upload's shapes (naming the upload that does not fit), then aggregate."""
        if not uploads:
            return ServerState(dict(state.global_state), dict(state.method_state))
        check_upload_shapes(self.name, uploads, self.upload_shapes(state), self.ranked_uploads)
        return ServerState(self.aggregate(state, uploads, optimizer), dict(state.method_state))

    def upload_shapes(self, state: ServerState) -> dict[str, torch.Size]:
        """The shape each uploaded tensor must have (with `ranked_uploads`: at most that rank)."""
        return {name: tensor.shape for name, tensor in state.global_state.items()}

    def aggregate(
        self,
        state: ServerState,
        uploads: Sequence[Mapping[str, torch.Tensor]],
        optimizer: ServerOptimizer,
    ) -> TensorDict:
        """New global tensors from uploads that fit: the examples-weighted mean by default."""
        return optimizer.step(state.global_state, weighted_mean_delta(uploads))
