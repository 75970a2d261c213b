"""pFedLoRA (Yi et al., arXiv 2310.13283): heterogeneous models, one shared small adapter.

Every client owns a model of its own architecture; all of them carry one small LoRA adapter of
the same shape. Each round a client first trains its model with the adapter frozen, then the
adapter with its model frozen; only the adapter is uploaded, and the server averages adapters
(weighted by examples). The model never leaves the client.

Where the adapter sits: the paper inserts it into the fully connected layers that the
heterogeneous models share in shape. With floral's CNN family (`model.name = "hetero-cnn"`,
floral.models.hetero) those are `neck` and `head`; on any other model the adapter goes on the
layers the usual adaptor options select (`include`, `layer_types`), and every client has the
same architecture.

How one scratch model serves five architectures: the family model holds all five trunks and
routes by a private `arch` buffer (client k gets architecture k mod 5). A client's private
state is only its own trunk, the shared-shape layers and `arch` (`keep_architecture`); the
other trunks are never loaded, trained, stored or sent for it. The engine stays generic: it
loads whatever private tensors a client has, and the unused trunks are simply not read by that
client's forward. `local-hetero` is the same routing with no adapter and no federation, the
reference each pFedLoRA client must beat.

On a language model the family is one pretrained model at several depths (`model.depths =
[30, 20, 10]`, floral.llm.depth): client k runs the first depths[k mod len] decoder blocks, and
its private state holds the embeddings, those blocks, the final norm and the head, and its
depth. The adapter must sit in blocks every client runs (the first min(depths)), chosen with
`include`, e.g. `["*.layers.[0-9].self_attn.q_proj", "*.layers.[0-9].self_attn.v_proj"]` for
depths down to 10: an adapter in a block some client skips would get zero updates from it
that dilute the average, so it is a configuration error. A pretrained model wants a smaller
step than the adapter: `model_lr` is the model phase's learning rate.

The model phase's optimizer state is not kept between rounds (`keeps_optimizer_state`): it
would be two more copies of each client's whole model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from floral.adapters import adaptor_parameter_names, attach
from floral.config import Range
from floral.data import ClientData, FederatedTask
from floral.errors import ConfigError
from floral.llm.depth import blocks_beyond, depth_family, family_depths, keep_depth
from floral.methods.adaptor_options import AdaptorOptions, adapter_spec, precondition_hook
from floral.methods.base import ClientJob, Method, Role
from floral.methods.local import LocalOnly
from floral.methods.phases import Phase, Phased
from floral.models.hetero import (
    ARCH_BUFFER,
    SHARED_LAYERS,
    HeteroFamily,
    architecture_of,
    keep_architecture,
)
from floral.train.loop import TrainConfig
from floral.train.state import StateSlots, TensorDict

__all__ = [
    "PHASES",
    "HeteroLocal",
    "PFedLoRA",
    "PFedLoRAOptions",
    "check_adapter_depth",
    "own_architecture",
]

PHASES = ("model", "adapter")  # the order of a round's local training


@dataclass
class PFedLoRAOptions(AdaptorOptions):
    rank: int | float = 8
    model_epochs: int = 0  # epochs of the model phase; 0 = train.local_epochs
    model_lr: float = 0.0  # learning rate of the model phase; 0 = train.lr
    adapter_epochs: int = 0  # epochs of the adapter phase; 0 = train.local_epochs

    RANGES: ClassVar[dict[str, Range]] = {
        "model_epochs": Range("[0, inf)", zero="train.local_epochs"),
        "model_lr": Range("[0, inf)", zero="train.lr"),
        "adapter_epochs": Range("[0, inf)", zero="train.local_epochs"),
    }


def own_architecture(initial: Mapping[str, torch.Tensor], client: ClientData) -> TensorDict:
    """A client's fresh private state: on the CNN family, only its own architecture's tensors;
    on a language model's family of depths, only the blocks of its own depth."""
    state: Mapping[str, torch.Tensor] = initial
    if ARCH_BUFFER in initial:
        state = keep_architecture(initial, architecture_of(client.client_id))
    elif family_depths(initial) is not None:
        state = keep_depth(initial, client.client_id)
    # Selected before copying: a language model's blocks beyond the depth are never copied.
    return {k: v.clone() for k, v in state.items()}


def check_adapter_depth(model: nn.Module) -> None:
    """On a family of depths, every adapter must be in a block that every client runs."""
    family = depth_family(model)
    if family is None:
        return
    prefix, depths = family
    shallowest = min(depths)
    beyond = blocks_beyond(adaptor_parameter_names(model), prefix, shallowest)
    if beyond:
        layer = beyond[0].rpartition(".")[0]
        raise ConfigError(
            f"method.include: the adapter on {layer} is in a block that clients of depth "
            f"{shallowest} never run, so their zero updates would dilute its average; include "
            f"only blocks 0 to {shallowest - 1} of {prefix.rstrip('.')} (e.g. "
            f'"*.layers.0.self_attn.q_proj"), an empty include adapts every layer'
        )


class PFedLoRA(Phased, Method):
    name = "pfedlora"
    description = "Own model per client (any architecture), one shared small adapter; alternating."
    Options = PFedLoRAOptions
    keeps_optimizer_state = False
    batchable = False  # two phases per step
    plain_mean = True
    mixture_mean = False
    secure_sum = True

    def build_model(self, model: nn.Module, task: FederatedTask) -> nn.Module:
        opts: PFedLoRAOptions = self.options
        for key in ("model_epochs", "adapter_epochs", "model_lr"):
            if getattr(opts, key) < 0:
                raise ConfigError(f"method.{key}: must be 0 or more, got {getattr(opts, key)}")
        if isinstance(model, HeteroFamily) and not opts.include:
            opts = dataclasses.replace(opts, include=list(SHARED_LAYERS))
        adapted = attach(model, adapter_spec(opts, num_adaptors=1))
        check_adapter_depth(adapted)
        return adapted

    def roles(self, model: nn.Module) -> dict[str, Role]:
        adaptors = set(adaptor_parameter_names(model))
        return {n: Role.GLOBAL if n in adaptors else Role.PRIVATE for n in model.state_dict()}

    def init_private(self, initial: TensorDict, client: ClientData) -> TensorDict:
        return own_architecture(initial, client)

    def backward_hook(self, model: nn.Module) -> Callable[[], None] | None:
        return precondition_hook(self.options, model)

    # -- the client step ---------------------------------------------------------------------
    def train_locally(self, slots: StateSlots, job: ClientJob) -> float:
        """The model phase, then the adapter phase; the upload is the adapter's delta."""
        generator = torch.Generator().manual_seed(job.seed)
        losses = [self.train_phase(slots, job, generator, p) for p in PHASES]
        return losses[-1]

    def phase_hook(self, model: nn.Module, name: str) -> Callable[[], None] | None:
        return self.backward_hook(model) if name == "adapter" else None

    def phase(self, model: nn.Module, config: TrainConfig, name: str) -> Phase:
        """What phase `name` trains: the adapter's tensors, or all the others."""
        if name not in PHASES:
            raise ValueError(f"phase {name!r}: expected one of {PHASES}")
        adaptors = set(adaptor_parameter_names(model))
        adapter = name == "adapter"
        names = frozenset(n for n, _ in model.named_parameters() if (n in adaptors) == adapter)
        lr = (config.adaptor_lr or config.lr) if adapter else (self.options.model_lr or config.lr)
        epochs = getattr(self.options, f"{name}_epochs") or config.local_epochs
        return Phase(f"pfedlora-{name}", names, lr, epochs)


class HeteroLocal(LocalOnly):
    """Local training of each client's own architecture (or depth, on a language model's family
    of depths): pFedLoRA without the adapter."""

    name = "local-hetero"
    # The README prints this line; model.depths gives the depth of each client on an LM.
    description = "No federation; client k trains its own architecture (k mod 5 on hetero-cnn)."
    batchable = True
    plain_mean = True
    mixture_mean = False
    secure_sum = True

    def init_private(self, initial: TensorDict, client: ClientData) -> TensorDict:
        return own_architecture(initial, client)
