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
from floral.data import ClientData, FederatedTask
from floral.errors import ConfigError
from floral.methods.base import WEIGHT_SUFFIX, ClientUpdate, Role
from floral.methods.lora_common import (
    LoraMethod,
    UploadShapeError,
    first_ranks,
    is_ranked,
    local_name,
)
from floral.train.loop import TrainConfig
from floral.train.optim import ServerOptimizer
from floral.train.state import StateSlots, TensorDict

__all__ = ["FLoRA", "factor_product", "stack_factors"]

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

    def build_model(self, model: nn.Module, task: FederatedTask) -> nn.Module:
        unsupported = sorted(set(self.options.layer_types) - set(_MERGEABLE))
        if unsupported:
            raise ConfigError(
                f"method.layer_types: flora merges only {', '.join(_MERGEABLE)} layers, "
                f"not {', '.join(unsupported)}"
            )
        model = super().build_model(model, task)
        names = adaptor_parameter_names(model)
        self.factor_shapes = {n: p.shape for n, p in model.named_parameters() if n in names}
        state = model.state_dict()
        for name in names:
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
    def client_step(
        self,
        slots: StateSlots,
        global_state: Mapping[str, torch.Tensor],
        private_state: Mapping[str, torch.Tensor],
        data: ClientData,
        config: TrainConfig,
        kind: str,
        seed: int,
    ) -> ClientUpdate:
        slots.load(global_state)
        slots.load(private_state)
        rank = self.rank_of(data.client_id)
        slots.load(self.fresh_factors(rank, seed))
        train_loss = self.train_locally(slots, data, config, kind, seed)
        trained = slots.snapshot(self.factor_shapes)
        upload = first_ranks(trained, rank) if rank is not None else trained
        weight = torch.tensor(float(data.num_train))
        upload.update({n + WEIGHT_SUFFIX: weight for n in trained if local_name(n) != "lora_B"})
        # Back to B = 0, so the scratch model is the merged base again (what is evaluated).
        slots.load(self.fresh_factors(None, seed))
        private = slots.snapshot(private_state.keys())
        return ClientUpdate(upload, data.num_train, private, {"train_loss": train_loss})

    def fresh_factors(self, rank: int | None, seed: int) -> TensorDict:
        """A new LoRA: A uniform in +-1/sqrt(fan_in) (PyTorch's Linear init) on the first
        `rank` ranks, zero elsewhere; B and the bias zero."""
        generator = torch.Generator().manual_seed(seed)
        fresh = {}
        for name, shape in self.factor_shapes.items():
            tensor = torch.zeros(shape)
            if local_name(name) == "lora_A":
                bound = shape[2:].numel() ** -0.5
                tensor.uniform_(-bound, bound, generator=generator)
                if rank is not None:
                    tensor[:, rank:] = 0.0
            fresh[name] = tensor
        return fresh

    # -- the server --------------------------------------------------------------------------
    def server_update(
        self,
        global_state: Mapping[str, torch.Tensor],
        uploads: Sequence[Mapping[str, torch.Tensor]],
        optimizer: ServerOptimizer,
    ) -> TensorDict:
        # A server that never built the model (Flower's ServerApp) learns the factors' shapes
        # from what the clients sent this round: the largest rank of each factor.
        built = getattr(self, "factor_shapes", None)
        self._round_shapes = built if built is not None else shapes_from_uploads(uploads)
        return super().server_update(global_state, uploads, optimizer)

    def upload_shapes(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Size]:
        return dict(self._round_shapes)

    def aggregate(
        self,
        global_state: Mapping[str, torch.Tensor],
        uploads: Sequence[Mapping[str, torch.Tensor]],
        optimizer: ServerOptimizer,
    ) -> TensorDict:
        delta: TensorDict = {}
        alpha = float(self.options.alpha)
        for name in self._round_shapes:
            prefix, _, local = name.rpartition(".")
            if local == "lora_A":
                weight = global_state[prefix + ".base.weight"]
                a, b = self._stacked(uploads, prefix)
                delta[prefix + ".base.weight"] = alpha * factor_product(a, b, weight.shape)
            elif local == "lora_bias":
                p = _shares(uploads, name)
                biases = torch.stack([upload[name][0] for upload in uploads])
                delta[prefix + ".base.bias"] = alpha * (p @ biases)
        return optimizer.step(global_state, delta)

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


def _shares(uploads: Sequence[Mapping[str, torch.Tensor]], name: str) -> torch.Tensor:
    """p_k = w_k / sum_j w_j from the weights the clients sent with `name`."""
    weights = torch.stack([upload[name + WEIGHT_SUFFIX].reshape(()) for upload in uploads])
    return weights / weights.sum()


def shapes_from_uploads(uploads: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Size]:
    """Each uploaded factor's shape at the largest rank any client sent."""
    shapes: dict[str, torch.Size] = {}
    for upload in uploads:
        for name, tensor in upload.items():
            if name.endswith(WEIGHT_SUFFIX):
                continue
            known = shapes.get(name)
            if known is None or (is_ranked(name) and tensor.shape[1] > known[1]):
                shapes[name] = tensor.shape
    return shapes
