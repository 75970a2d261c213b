"""Model choice from the `[model]` table and the task it must fit."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from floral.data import FederatedTask
from floral.errors import ConfigError
from floral.models.networks import MLP, VGG8, LinearModel, PaperCNN

__all__ = ["MODEL_NAMES", "ModelConfig", "build_model", "resolve_name"]

MODEL_NAMES: tuple[str, ...] = ("auto", "linear", "mlp", "cnn", "vgg8")

# The paper's model for each dataset, picked by name = "auto".
_AUTO = {
    "synthetic-linear": ("linear", []),
    "synthetic-mlp": ("mlp", [20]),
    "mnist": ("mlp", [200]),
    "fashion-mnist": ("mlp", [200]),
    "mnist5k": ("mlp", [200]),
    "digits": ("mlp", [200]),
    "cifar10": ("cnn", []),
    "cifar100": ("vgg8", []),
}


@dataclass
class ModelConfig:
    """The `[model]` table. `hidden` applies to name = "mlp"; "auto" takes the paper's model."""

    name: str = "auto"  # auto | linear | mlp | cnn | vgg8
    hidden: list[int] = field(default_factory=lambda: [200])


def resolve_name(cfg: ModelConfig, task: FederatedTask) -> tuple[str, list[int]]:
    """The concrete model name and hidden widths that `cfg` means for `task`."""
    if cfg.name not in MODEL_NAMES:
        choices = ", ".join(MODEL_NAMES)
        raise ConfigError(f"model.name: unknown '{cfg.name}' (choose from {choices})")
    if cfg.name == "auto":
        if task.name not in _AUTO:
            raise ConfigError(f"model.name: no automatic model for dataset '{task.name}'; name one")
        name, hidden = _AUTO[task.name]
        return name, list(hidden)
    return cfg.name, list(cfg.hidden)


def build_model(cfg: ModelConfig, task: FederatedTask) -> nn.Module:
    """A freshly initialized model for `task` (seed torch beforehand for a repeatable init)."""
    name, hidden = resolve_name(cfg, task)
    in_features = math.prod(task.input_shape)
    if name == "linear":
        return LinearModel(in_features, task.num_outputs)
    if name == "mlp":
        bad = [w for w in hidden if not isinstance(w, int) or isinstance(w, bool) or w < 1]
        if bad:
            raise ConfigError(f"model.hidden: widths must be positive integers, got {hidden}")
        return MLP(in_features, hidden, task.num_outputs)
    if len(task.input_shape) != 3:
        raise ConfigError(
            f"model.name: '{name}' needs images (C, H, W); {task.name} gives {task.input_shape}"
        )
    image_shape = (task.input_shape[0], task.input_shape[1], task.input_shape[2])
    if name == "cnn":
        return PaperCNN(image_shape, task.num_outputs)
    return VGG8(image_shape, task.num_outputs)
