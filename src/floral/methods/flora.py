"""FLoRA (Wang et al., arXiv 2409.05976): ranks per client, exact stacking aggregation.

Each round every sampled client starts a fresh LoRA of its own rank r_k on the current base
(A random from the client's seed, B = 0), trains it, and sends A_k and B_k. The server stacks
them along the rank axis, A's scaled by p_k = n_k / sum n:

    A_stack = [p_1 A_1; ...; p_K A_K],  B_stack = [B_1, ..., B_K],
    B_stack A_stack = sum_k p_k B_k A_k          (exactly: no cross terms B_j A_k)

and merges alpha * B_stack A_stack into the base weight (the adaptive biases: their p-weighted
mean into the base bias), through the server optimizer (SGD with lr 1 is the plain merge). The
base of the adapted layers is therefore global and sent down each round; the factors live for
one client step only, so the engine neither sends nor keeps them (role FROZEN), and the model
it evaluates is the merged base.

Stacking reveals each client's factors to the server (no secure aggregation), as in the paper.
Only Linear and Conv2d layers are adapted: their products are merged into a weight.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import nn

from floral.adapters import adaptor_parameter_names
from floral.data import FederatedTask, TaskConfig
from floral.errors import ConfigError
from floral.methods.base import WEIGHT_SUFFIX, ClientJob, ClientUpdate, Role, ServerState
from floral.methods.lora_common import (
    LoraMethod,
    UploadShapeError,
    first_ranks,
    local_name,
)
from floral.train.loop import TrainConfig
from floral.train.optim import ServerOptimizer
from floral.train.state import StateSlots, TensorDict

__all__ = ["FLoRA", "factor_product", "fresh_factors", "stack_factors"]

SHAPE_PREFIX = "factor_shape/"  # server state: each factor's full shape

_MERGEABLE = ("linear", "conv2d")


def factor_product(a: torch.Tensor, b: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """sum_j B_j (x) A_j laid out as the layer's weight `shape`.

    a (S, d_in, *ka) and b (S, d_out, *kb) as adaptors store them (B transposed); for a
    Linear that is B^T A (d_out, d_in), for a conv the kernel (d_out, d_in, kh, kw), where one
    of each pair of kernel axes of A and B is 1 (separable: (1, kw) and (kh, 1); kxk-1x1:
    (kh, kw) and (1, 1)).
    """
    s = a.shape[0]
    product = b.reshape(s, -1).T @ a.reshape(s, -1)
    product = product.reshape(*b.shape[1:], *a.shape[1:])
    b_axes = b.dim() - 1
    order = [0, b_axes, *range(1, b_axes), *range(b_axes + 1, product.dim())]
    return product.permute(order).reshape(shape)


def stack_factors(
    a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_stack, B_stack) from per-client factors (r_k, d...) and weights p (K,)."""
    ranks = torch.tensor([len(factor) for factor in a])
    scale = p.repeat_interleave(ranks).view(-1, *[1] * (a[0].dim() - 1))
    return torch.cat(list(a)) * scale, torch.cat(list(b))


class FLoRA(LoraMethod):
    name = "flora"
    description = "Ranks per client; exact stacking of LoRA factors, merged into the base."
    factor_roles: ClassVar[Mapping[str, Role]] = {
        "lora_A": Role.FROZEN,
        "lora_B": Role.FROZEN,
        "lora_bias": Role.FROZEN,
    }
    ranked_uploads = True
    batchable = False  # a fresh LoRA per step, and factors uploaded instead of deltas
    plain_mean = False  # stacked factors
    mixture_mean = False
    secure_sum = False  # ranks per client: each upload is read on its own

    def check_against(self, train: TrainConfig, task: TaskConfig) -> None:
        super().check_against(train, task)
        self._check_layer_types()

    def _check_layer_types(self) -> None:
        unsupported = sorted(set(self.options.layer_types) - set(_MERGEABLE))
        if unsupported:
            raise ConfigError(
                f"method.layer_types: flora merges only {', '.join(_MERGEABLE)} layers, "
                f"not {', '.join(unsupported)}"
            )

    def build_model(self, model: nn.Module, task: FederatedTask) -> nn.Module:
        self._check_layer_types()
        model = super().build_model(model, task)
        state = model.state_dict()
        for name in adaptor_parameter_names(model):
            prefix = name.rpartition(".")[0]
            if local_name(name) == "lora_bias" and prefix + ".base.bias" not in state:
                raise ConfigError(
                    f"method.bias: layer {prefix!r} has no bias to merge the adaptive bias "
                    "into; set bias = false"
                )
        return model

    def base_role(self, name: str) -> Role:
        # The base of an adapted layer is where the stacked products are merged.
        return Role.GLOBAL if name.endswith((".base.weight", ".base.bias")) else Role.FROZEN

    def trains(self, name: str, role: Role, adaptor: bool) -> bool:
        return adaptor

    # -- the client step ---------------------------------------------------------------------
    def client_step(self, slots: StateSlots, job: ClientJob) -> ClientUpdate:
        shapes = factor_shapes(slots)
        slots.load(job.global_state)
        slots.load(job.private_state)
        rank = self.rank_of(job.client)
        slots.load(fresh_factors(shapes, rank, job.seed))
        train_loss = self.train_locally(slots, job)
        trained = slots.snapshot(shapes)
        upload = first_ranks(trained, rank) if rank is not None else trained
        weight = torch.tensor(float(job.data.num_train))
        upload.update({n + WEIGHT_SUFFIX: weight for n in trained if local_name(n) != "lora_B"})
        # Back to B = 0, so the scratch model is the merged base again (what is evaluated).
        slots.load(fresh_factors(shapes, None, job.seed))
        private = slots.snapshot(job.private_state.keys())
        return ClientUpdate(upload, job.data.num_train, private, {"train_loss": train_loss})

    # -- the server --------------------------------------------------------------------------
    def init_server_state(
        self, model: nn.Module, global_state: Mapping[str, torch.Tensor]
    ) -> TensorDict:
        """The factors' full shapes, which uploads are checked against: the factors are not
        global tensors, so a server that builds no model learns them only from here."""
        names = adaptor_parameter_names(model)
        return {
            SHAPE_PREFIX + name: torch.tensor(list(p.shape))
            for name, p in model.named_parameters() if name in names
        }

    def upload_shapes(self, state: ServerState) -> dict[str, torch.Size]:
        return {
            name.removeprefix(SHAPE_PREFIX): torch.Size(shape.tolist())
            for name, shape in state.method_state.items() if name.startswith(SHAPE_PREFIX)
        }

    def aggregate(
        self,
        state: ServerState,
        uploads: Sequence[Mapping[str, torch.Tensor]],
        optimizer: ServerOptimizer,
    ) -> TensorDict:
        delta: TensorDict = {}
        alpha = float(self.options.alpha)
        for name in self.upload_shapes(state):
            prefix, _, local = name.rpartition(".")
            if local == "lora_A":
                weight = state.global_state[prefix + ".base.weight"]
                a, b = self._stacked(uploads, prefix)
                delta[prefix + ".base.weight"] = alpha * factor_product(a, b, weight.shape)
            elif local == "lora_bias":
                p = _shares(uploads, name)
                biases = torch.stack([upload[name][0] for upload in uploads])
                delta[prefix + ".base.bias"] = alpha * (p @ biases)
        return optimizer.step(state.global_state, delta)

    def _stacked(
        self, uploads: Sequence[Mapping[str, torch.Tensor]], prefix: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        a_name, b_name = prefix + ".lora_A", prefix + ".lora_B"
        for index, upload in enumerate(uploads):
            if upload[a_name].shape[1] != upload[b_name].shape[1]:
                raise UploadShapeError(
                    f"{self.name}: upload {index + 1} of {len(uploads)} sent {a_name} of rank "
                    f"{upload[a_name].shape[1]} but {b_name} of rank {upload[b_name].shape[1]}"
                )
        a = [upload[a_name][0] for upload in uploads]  # one adaptor: drop the C axis
        b = [upload[b_name][0] for upload in uploads]
        return stack_factors(a, b, _shares(uploads, a_name))


def factor_shapes(slots: StateSlots) -> dict[str, torch.Size]:
    """The LoRA factors of the scratch model and their shapes (at the model's full rank)."""
    def build() -> dict[str, torch.Size]:
        names = set(adaptor_parameter_names(slots.model))
        return {n: p.shape for n, p in slots.model.named_parameters() if n in names}

    shapes: dict[str, torch.Size] = slots.memo("flora-factor-shapes", build)
    return shapes


def fresh_factors(shapes: Mapping[str, torch.Size], rank: int | None, seed: int) -> TensorDict:
    """A new LoRA: A uniform in +-1/sqrt(fan_in) (PyTorch's Linear init) on the first `rank`
    ranks, zero elsewhere; B and the bias zero."""
    generator = torch.Generator().manual_seed(seed)
    fresh = {}
    for name, shape in shapes.items():
        tensor = torch.zeros(shape)
        if local_name(name) == "lora_A":
            bound = shape[2:].numel() ** -0.5
            tensor.uniform_(-bound, bound, generator=generator)
            if rank is not None:
                tensor[:, rank:] = 0.0
        fresh[name] = tensor
    return fresh


def _shares(uploads: Sequence[Mapping[str, torch.Tensor]], name: str) -> torch.Tensor:
    """p_k = w_k / sum_j w_j from the weights the clients sent with `name`."""
    weights = torch.stack([upload[name + WEIGHT_SUFFIX].reshape(()) for upload in uploads])
    return weights / weights.sum()
