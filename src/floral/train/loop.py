"""The local training loop: a reader can follow one SGD step from top to bottom."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from floral.train.objective import LossFn

__all__ = [
    "TrainConfig",
    "epoch_batches",
    "seeded_cpu_rng",
    "sgd",
    "train_epochs",
]



@dataclass
class TrainConfig:
    """The `[train]` table: rounds, client sampling, local SGD and the server optimizer."""

    rounds: int = 100
    clients_per_round: float = 0.1  # fraction of clients sampled each round, in (0, 1]
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1  # base model
    adaptor_lr: float = 0.0  # adaptors; 0 means "same as lr"
    router_lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    server_optimizer: str = "sgd"  # sgd | adam: applied to the mean update as a pseudo-gradient
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
    dp_mode: str = "central"
    eval_batch_size: int = 2048


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
) -> float:
    """Run `epochs` passes of minibatch SGD over (x, y) in a seeded order; return the mean loss."""
    if not model.training:  # train() walks every module: skip it when nothing would change
        model.train()
    n = len(x)
    losses = []
    for _ in range(epochs):
        for batch in epoch_batches(n, batch_size, generator):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[batch]), y[batch])
            loss.backward()
            if after_backward is not None:
                after_backward()
            optimizer.step()
            losses.append(loss.detach())  # no .item() per step: it would sync every step
    return torch.stack(losses).mean().item() if losses else float("nan")


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """One epoch's minibatches of example indices: a seeded permutation cut in order.

    The one place the batch order is drawn, so the batched engine (floral.engines.batched)
    gives every client exactly the batches it gets here.
    """
    order = torch.randperm(n, generator=generator)
    return order.split(batch_size) if n else ()  # split() of an empty order gives one batch


def sgd(groups: Sequence[dict], config: TrainConfig) -> torch.optim.SGD:
    """Plain SGD over parameter groups that each carry their own lr; empty groups are dropped."""
    groups = [g for g in groups if g["params"]]
    return torch.optim.SGD(
        groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )


@contextmanager
def seeded_cpu_rng(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator (router noise, dropout) for a block, then restore it.

    Only the CPU generator: `torch.manual_seed` also queues seeds for every accelerator
    backend, which costs more than a small client's whole local step.
    """
    generator = torch.default_generator
    saved = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(saved)
