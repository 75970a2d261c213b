"""The local training loop: a reader can follow one optimizer step from top to bottom."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn

from floral.config import Range, check_choice, choices, field_default
from floral.errors import ConfigError
from floral.train.device import Placement
from floral.train.objective import Crop, LossFn, keep_all
from floral.train.sgd import SGD

__all__ = [
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "DpMode",
    "LrSchedule",
    "Optimizer",
    "ServerOptimizerKind",
    "TrainConfig",
    "build_optimizer",
    "check_local_optimizer",
    "check_settings_take_effect",
    "epoch_batches",
    "round_lr_factor",
    "set_lr_factor",
    "train_epochs",
]

Optimizer = Literal["sgd", "adamw"]
LrSchedule = Literal["constant", "cosine", "linear"]
ServerOptimizerKind = Literal["sgd", "adam"]
DpMode = Literal["central", "local"]
OPTIMIZERS: tuple[str, ...] = choices(Optimizer)
LR_SCHEDULES: tuple[str, ...] = choices(LrSchedule)


@dataclass
class TrainConfig:
    """The `[train]` table: rounds, client sampling, the local optimizer and the server's."""

    rounds: int = 100
    clients_per_round: float = 0.1  # fraction of clients sampled each round, in (0, 1]
    local_epochs: int = 1
    batch_size: int = 32
    optimizer: Optimizer = "sgd"  # the clients' optimizer
    lr: float = 0.1  # base model
    adaptor_lr: float = 0.0  # adaptors; 0 means "same as lr"
    router_lr: float = 0.1
    momentum: float = 0.0  # sgd
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    eps: float = 1e-8  # adamw
    # The local learning rates over rounds: a linear warm-up over the first `warmup_rounds`,
    # then constant, or decaying to zero by a cosine or a straight line at the last round.
    lr_schedule: LrSchedule = "constant"
    warmup_rounds: int = 0
    grad_accumulation: int = 1  # minibatches whose gradients add up into one optimizer step
    max_grad_norm: float = 0.0  # clip each step's gradient to this L2 norm; 0 = no clipping
    gradient_checkpointing: bool = False  # language models: recompute activations in backward
    server_optimizer: ServerOptimizerKind = "sgd"  # applied to the mean update as a pseudo-gradient
    server_lr: float = 1.0
    server_momentum: float = 0.0
    server_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    server_eps: float = 1e-8
    # How the server combines the clients' updates: "mean" (weighted by examples), or, robust
    # to a minority of bad clients, "median" or "trimmed:<fraction cut at each end>".
    aggregation: str = "mean"
    # User-level differential privacy (DP-FedAvg): each client's update is clipped to L2 norm
    # dp_clip (0 = off) and Gaussian noise of standard deviation dp_noise * dp_clip is added
    # to their sum by the server ("central"), or to each update by its client ("local"); the
    # privacy spent is reported as dp_epsilon at dp_delta.
    dp_clip: float = 0.0
    dp_noise: float = 0.0
    dp_delta: float = 1e-5
    dp_mode: DpMode = "central"
    eval_batch_size: int = 2048

    RANGES: ClassVar[dict[str, Range]] = {
        "rounds": Range("[1, inf)"),
        "clients_per_round": Range("(0, 1]"),
        "local_epochs": Range("[1, inf)"),
        "batch_size": Range("[1, inf)"),
        "lr": Range("(0, inf)"),
        "adaptor_lr": Range("[0, inf)", zero="the same as train.lr"),
        "router_lr": Range("[0, inf)"),
        "momentum": Range("[0, 1)"),
        "weight_decay": Range("[0, inf)"),
        "betas": Range("[0, 1)", length=2),
        "eps": Range("(0, inf)"),
        "warmup_rounds": Range("[0, inf)"),  # and fewer than rounds (check_local_optimizer)
        "grad_accumulation": Range("[1, inf)"),
        "max_grad_norm": Range("[0, inf)"),
        "server_lr": Range("(0, inf)"),
        "server_momentum": Range("[0, 1)"),
        "server_betas": Range("[0, 1)", length=2),
        "server_eps": Range("(0, inf)"),
        "dp_clip": Range("[0, inf)"),
        "dp_noise": Range("[0, inf)"),
        "dp_delta": Range("(0, 1)"),
        "eval_batch_size": Range("[1, inf)"),
    }


def train_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    *,
    batch_size: int,
    epochs: int,
    generator: torch.Generator,
    after_backward: Callable[[], None] | None = None,
    placement: Placement | None = None,
    accumulation: int = 1,
    max_grad_norm: float = 0.0,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    crop: Crop = keep_all,
) -> float:
    """Run `epochs` passes of minibatch training over (x, y) in a seeded order; return the mean
    loss. Batches are cut by `crop` (the objective's) and move to `placement.device` one at a
    time; `forward` (the model's compiled forward) stands in for `model(x)` when given."""
    if not model.training:  # train() walks every module: skip it when nothing would change
        model.train()
    placement = placement or Placement()
    device, forward = placement.device, forward or model
    scaler = torch.amp.GradScaler(device.type) if placement.dtype is torch.float16 else None
    n = len(x)
    losses = []
    for _ in range(epochs):
        batches = epoch_batches(n, batch_size, generator)
        for i, batch in enumerate(batches):
            if i % accumulation == 0:
                optimizer.zero_grad(set_to_none=True)
            xb, yb = crop(x[batch], y[batch])
            xb, yb = xb.to(device, non_blocking=True), yb.to(device)
            with placement.autocast():
                loss = loss_fn(forward(xb), yb)
            scaled = loss if accumulation == 1 else loss / accumulation
            (scaled if scaler is None else scaler.scale(scaled)).backward()
            losses.append(loss.detach())  # no .item() per step: it would sync every step
            if (i + 1) % accumulation and i + 1 < len(batches):
                continue  # accumulate; an epoch's last minibatch always ends in a step
            _step(optimizer, scaler, after_backward, max_grad_norm)
    return torch.stack(losses).float().mean().item() if losses else float("nan")


def _step(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    after_backward: Callable[[], None] | None,
    max_grad_norm: float,
) -> None:
    """One optimizer step on the gradients in `.grad`: unscaled (float16), preconditioned by
    the method's hook, clipped, applied."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if after_backward is not None:
        after_backward()
    if max_grad_norm > 0:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        nn.utils.clip_grad_norm_(params, max_grad_norm)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """One epoch's minibatches of example indices: a seeded permutation cut in order.

    The one place the batch order is drawn, so the batched engine (floral.engines.batched)
    gives every client exactly the batches it gets here.
    """
    order = torch.randperm(n, generator=generator, device="cpu")  # data stay on the CPU
    return order.split(batch_size) if n else ()  # split() of an empty order gives one batch


def build_optimizer(groups: Sequence[dict], config: TrainConfig) -> torch.optim.Optimizer:
    """The clients' optimizer (`train.optimizer`) over parameter groups that each carry their
    own lr; empty groups are dropped."""
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "adamw":
        beta1, beta2 = config.betas
        return torch.optim.AdamW(
            groups, lr=config.lr, betas=(beta1, beta2), eps=config.eps,
            weight_decay=config.weight_decay,
        )
    # floral's SGD: torch's update, without importing torch's compiler (floral.train.sgd).
    return SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def check_local_optimizer(config: TrainConfig) -> None:
    """Checks of the local optimizer's settings beyond their ranges (`TrainConfig.RANGES`,
    held by floral.config.check_ranges), each a one-line error naming the key."""
    check_choice("train.optimizer", config.optimizer, Optimizer)
    check_choice("train.lr_schedule", config.lr_schedule, LrSchedule)
    if not 0 <= config.warmup_rounds < config.rounds:
        raise ConfigError(f"train.warmup_rounds: must be in [0, train.rounds), got "
                          f"{config.warmup_rounds}")


# The settings of one kind of optimizer, by the setting that picks the kind: set away from its
# default while another kind is picked, a setting would never take effect, so it is refused.
_KIND_SETTINGS: dict[str, dict[str, tuple[str, ...]]] = {
    "optimizer": {"sgd": ("momentum",), "adamw": ("betas", "eps")},
    "server_optimizer": {"sgd": ("server_momentum",), "adam": ("server_betas", "server_eps")},
}


def check_settings_take_effect(config: TrainConfig) -> None:
    """A one-line error for a setting of an optimizer that is not the one picked (momentum with
    adamw, betas with sgd, ...), or of differential privacy while it is off: it could never
    take effect."""
    defaults = {f.name: field_default(f) for f in dataclasses.fields(config)}
    for key in ("dp_delta", "dp_mode"):
        value = getattr(config, key)
        if not config.dp_clip and value != defaults[key]:
            raise ConfigError(f"train.{key}: {value!r} takes effect only with differential "
                              "privacy (train.dp_clip > 0)")
    for picker, kinds in _KIND_SETTINGS.items():
        picked = getattr(config, picker)
        for kind, keys in kinds.items():
            for key in keys:
                value = getattr(config, key)
                if kind != picked and value != defaults[key]:
                    raise ConfigError(f"train.{key}: {value} takes effect only with "
                                      f"train.{picker} = {kind!r} (this run's is {picked!r})")


def round_lr_factor(config: TrainConfig, round_: int) -> float:
    """What the learning rates are multiplied by in round `round_` (1-based): the warm-up's
    round / warmup_rounds, then 1 (constant), or a cosine or a line from 1 down towards 0."""
    warmup = config.warmup_rounds
    if round_ <= warmup:
        return round_ / warmup
    if config.lr_schedule == "constant":
        return 1.0
    progress = (round_ - warmup - 1) / max(1, config.rounds - warmup)
    if config.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def set_lr_factor(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Every group's lr set to its base lr (as built) times `factor`."""
    for group in optimizer.param_groups:
        base = group.setdefault("base_lr", group["lr"])
        group["lr"] = base * factor
