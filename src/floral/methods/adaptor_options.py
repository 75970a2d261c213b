"""Options shared by the methods that attach LoRA adaptors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from floral.adapters import AdapterSpec, RouterSpec, adaptor_parameter_names
from floral.adapters.precondition import Preconditioner
from floral.adapters.spec import ConvForm, LayerType
from floral.config import Range
from floral.errors import ConfigError
from floral.methods.base import Role
from floral.train.loop import TrainConfig

__all__ = [
    "AdaptorOptions",
    "adapter_spec",
    "adaptor_param_groups",
    "base_tensor_names",
    "freeze_base",
    "frozen_base_roles",
    "precondition_hook",
]


@dataclass
class AdaptorOptions:
    rank: int | float = 0.01  # an int, or a fraction of the layer (DESIGN.md §1)
    min_rank: int = 1
    alpha: float = 1.0
    bias: bool = True
    layer_types: list[LayerType] = field(default_factory=lambda: ["linear", "conv2d"])
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    conv_form: ConvForm = "separable"
    precondition: bool = False  # (B^T B)^-1 / (A A^T)^-1 preconditioned factor gradients
    precondition_eps: float = 1e-5

    RANGES: ClassVar[dict[str, Range]] = {
        "rank": Range("[1, inf)", fraction="(0, 1]"),
        "min_rank": Range("[1, inf)"),
        "alpha": Range("(0, inf)"),
        "precondition_eps": Range("(0, inf)"),
    }


def adapter_spec(
    options: AdaptorOptions, num_adaptors: int, router: RouterSpec | None = None
) -> AdapterSpec:
    if isinstance(options.rank, float) and not 0 < options.rank <= 1:
        raise ConfigError(f"method.rank: a fraction must be in (0, 1], got {options.rank}")
    if isinstance(options.rank, int) and options.rank < 1:
        raise ConfigError(f"method.rank: must be at least 1, got {options.rank}")
    return AdapterSpec(
        num_adaptors=num_adaptors,
        rank=options.rank,
        min_rank=options.min_rank,
        alpha=options.alpha,
        bias=options.bias,
        layer_types=tuple(options.layer_types),
        include=tuple(options.include),
        exclude=tuple(options.exclude),
        conv_form=options.conv_form,
        router=router or RouterSpec(),
    )


def precondition_hook(options: AdaptorOptions, model: nn.Module) -> Callable[[], None] | None:
    """The backward hook of `precondition = true`: preconditioned factor gradients."""
    if not options.precondition:
        return None
    eps = options.precondition_eps
    return Preconditioner(model, eps)


def adaptor_param_groups(
    model: nn.Module, config: TrainConfig, router_prefix: str = "floral_router."
) -> list[dict]:
    """SGD groups: base (lr), adaptors (adaptor_lr, defaulting to lr), router (router_lr)."""
    adaptor_names = set(adaptor_parameter_names(model))
    groups: dict[str, list[nn.Parameter]] = {"base": [], "adaptors": [], "router": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith(router_prefix):
            groups["router"].append(param)
        elif name in adaptor_names:
            groups["adaptors"].append(param)
        else:
            groups["base"].append(param)
    return [
        {"params": groups["base"], "lr": config.lr},
        {"params": groups["adaptors"], "lr": config.adaptor_lr or config.lr},
        {"params": groups["router"], "lr": config.router_lr},
    ]


def base_tensor_names(model: nn.Module, router_prefix: str = "floral_router.") -> list[str]:
    """state_dict names of the base model's parameters (not adaptors, not the router).

    By identity, so a tied parameter (a language model's embedding and output head) is found
    under every name the state_dict gives it.
    """
    adaptors = set(adaptor_parameter_names(model))
    base_ids = {
        id(p) for n, p in model.named_parameters()
        if n not in adaptors and not n.startswith(router_prefix)
    }
    return [n for n, t in model.state_dict(keep_vars=True).items() if id(t) in base_ids]


def freeze_base(model: nn.Module, train_base: bool) -> None:
    """With train_base false, the base parameters get no gradients (no memory for them)."""
    if not train_base:
        base = set(base_tensor_names(model))
        for name, parameter in model.named_parameters():
            if name in base:
                parameter.requires_grad_(False)


def frozen_base_roles(
    model: nn.Module, roles: dict[str, Role], train_base: bool
) -> dict[str, Role]:
    """With train_base false, the base parameters are FROZEN: never trained, never sent, so
    only adaptors (and routers) travel. Buffers keep their roles."""
    if not train_base:
        for name in base_tensor_names(model):
            roles[name] = Role.FROZEN
    return roles
