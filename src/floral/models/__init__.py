"""Models of the FLoRAL paper's experiments and `build_model`, which picks one for a task."""

from __future__ import annotations

from floral.models.build import (
    MODEL_NAMES,
    ModelConfig,
    build_model,
    enable_gradient_checkpointing,
    resolve_name,
)
from floral.models.networks import MLP, VGG8, LinearModel, PaperCNN

__all__ = [
    "MODEL_NAMES",
    "ModelConfig",
    "build_model",
    "enable_gradient_checkpointing",
    "resolve_name",
    "LinearModel",
    "MLP",
    "PaperCNN",
    "VGG8",
]
