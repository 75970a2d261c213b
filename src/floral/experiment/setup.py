"""Set-up: the method, the data and the model an experiment describes, and its engine.

Every engine builds from here: a Flower node rebuilds exactly the local engine's model.
"""

from __future__ import annotations

import torch

from floral.data import FederatedTask, build_task
from floral.engines.local import LocalEngine
from floral.errors import ConfigError
from floral.experiment.config import ExperimentConfig, placement_of
from floral.methods import Method, Role
from floral.models import build_model, enable_gradient_checkpointing
from floral.models.quantize import quantize_frozen
from floral.train.device import DTYPES, cast_tensors

__all__ = ["build_engine", "build_setup", "quantize_base"]


def build_setup(
    config: ExperimentConfig, task: FederatedTask | None = None
) -> tuple[Method, FederatedTask, torch.nn.Module]:
    """Method, data and model from a config, seeded so that the same config gives the same ones.

    Every engine builds from here: a Flower client rebuilds exactly the local engine's model.
    `task` replaces the config's (a Flower node's own data, of the same shape).
    """
    task = build_task(config.task, config.seed) if task is None else task
    method = config.build_method()
    torch.manual_seed(config.seed)
    model = build_model(config.model, task)
    if config.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model = method.build_model(model, task)
    # Only what never changes is stored in low precision: trained tensors stay float32.
    frozen = [name for name, role in method.roles(model).items() if role is Role.FROZEN]
    cast_tensors(model, frozen, DTYPES[config.model.dtype])
    quantize_base(config, method, model, frozen)
    return method, task, model


def quantize_base(
    config: ExperimentConfig, method: Method, model: torch.nn.Module, frozen: list[str]
) -> None:
    """`model.quantize`: the frozen linear layers in 8 or 4 bits, checked to stay frozen."""
    mode = config.model.quantize
    names = quantize_frozen(model, set(frozen), mode, DTYPES[config.model.dtype])
    if mode == "none":
        return
    if not names:
        raise ConfigError(
            f"model.quantize = {mode!r}: no linear layer to quantize: {config.method_name} "
            "trains them all (use a method with a frozen base, e.g. fedit, or "
            "method.train_base = false), or, for nf4 on a CPU, none has an input width that is a "
            "multiple of 64 and an output width that is a multiple of 32"
        )
    roles = method.roles(model)
    moving = [n for n in roles if roles[n] is not Role.FROZEN and n.rpartition(".")[0] in names]
    if moving:
        raise ConfigError(f"model.quantize: {moving[0]} would be quantized but is not frozen")


def build_engine(
    config: ExperimentConfig, task: FederatedTask | None = None
) -> tuple[LocalEngine, FederatedTask]:
    """The in-process engine for a config (on `task` instead of the config's, if given)."""
    placement = placement_of(config)
    method, task, model = build_setup(config, task)
    engine = LocalEngine(
        method, task, model, config.train, config.engine, config.seed, config.comm, placement,
        config.attack,
    )
    return engine, task
