"""Local adaptor: a global base model, one private LoRA adaptor per client (FLoRAL's baseline)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from floral.adapters import adaptor_parameter_names, attach
from floral.data import FederatedTask
from floral.methods.adaptor_options import (
    AdaptorOptions,
    adapter_spec,
    adaptor_param_groups,
    freeze_base,
    frozen_base_roles,
    precondition_hook,
)
from floral.methods.base import Method, Role
from floral.train.loop import TrainConfig

__all__ = ["LocalAdaptor", "LocalAdaptorOptions"]


@dataclass
class LocalAdaptorOptions(AdaptorOptions):
    precondition: bool = True
    train_base: bool = True  # false: the base is frozen; only the private adaptors train


class LocalAdaptor(Method):
    name = "local-adaptor"
    description = "Global base model; each client keeps its own private LoRA adaptor."
    Options = LocalAdaptorOptions
    batchable = True
    plain_mean = True
    mixture_mean = False
    secure_sum = True

    def build_model(self, model: nn.Module, task: FederatedTask) -> nn.Module:
        attach(model, adapter_spec(self.options, num_adaptors=1))
        freeze_base(model, self.options.train_base)
        return model

    def roles(self, model: nn.Module) -> dict[str, Role]:
        roles = super().roles(model)
        for name in adaptor_parameter_names(model):
            roles[name] = Role.PRIVATE
        return frozen_base_roles(model, roles, self.options.train_base)

    def param_groups(self, model: nn.Module, config: TrainConfig) -> list[dict]:
        return adaptor_param_groups(model, config)

    def backward_hook(self, model: nn.Module) -> Callable[[], None] | None:
        return precondition_hook(self.options, model)
