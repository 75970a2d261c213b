"""Local training in phases that each train only some tensors (pFedLoRA, FDLoRA).

In a phase only the named parameters require gradients: the frozen ones get no gradient at all,
so the phase neither moves them nor pays for their backward pass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from floral.methods.base import ClientJob, local_epochs, round_optimizer
from floral.train.loop import TrainConfig, build_optimizer
from floral.train.state import StateSlots

__all__ = ["Phase", "Phased", "run_phase", "train_only"]


@dataclass(frozen=True)
class Phase:
    """What one phase trains: these parameters, at this learning rate, for these epochs."""

    key: str  # names the phase's optimizer, built once per scratch model
    names: frozenset[str]
    lr: float
    epochs: int


@contextmanager
def train_only(model: nn.Module, names: Collection[str]) -> Iterator[None]:
    """Inside the block only the parameters named in `names` require gradients; every flag is
    restored afterwards."""
    parameters = list(model.named_parameters())
    saved = [p.requires_grad for _, p in parameters]
    try:
        for name, parameter in parameters:
            parameter.requires_grad_(name in names)
        yield
    finally:
        for (_, parameter), flag in zip(parameters, saved, strict=True):
            parameter.requires_grad_(flag)


def run_phase(
    slots: StateSlots,
    phase: Phase,
    job: ClientJob,
    generator: torch.Generator,
    after_backward: Callable[[], None] | None = None,
) -> float:
    """The local optimizer on the phase's parameters only, over the client's data; returns the
    mean loss."""
    model, config = slots.model, job.config

    def build() -> torch.optim.Optimizer:
        params = [p for n, p in model.named_parameters() if n in phase.names]
        return build_optimizer([{"params": params, "lr": phase.lr}], config)

    optimizer = round_optimizer(slots, job, ("phase", phase.key, phase.lr, id(config)), build)
    with train_only(model, phase.names):
        return local_epochs(slots, job, optimizer, phase.epochs, generator, after_backward)


class Phased(ABC):
    """Mixin for methods whose local training runs in named phases: `phase` says what a phase
    trains, `train_phase` runs it (its `Phase` built once per scratch model)."""

    @abstractmethod
    def phase(self, model: nn.Module, config: TrainConfig, name: str) -> Phase:
        """What phase `name` trains, and how."""

    def phase_hook(self, model: nn.Module, name: str) -> Callable[[], None] | None:
        """Called between backward and step in phase `name` (gradient preconditioning)."""
        return None

    def train_phase(
        self, slots: StateSlots, job: ClientJob, generator: torch.Generator, name: str
    ) -> float:
        """Run phase `name` on the client's data; returns its mean training loss."""
        key = ("phase-spec", type(self).__name__, name, id(job.config))
        spec = slots.memo(key, lambda: self.phase(slots.model, job.config, name))
        hook = self.phase_hook(slots.model, name)
        return run_phase(slots, spec, job, generator, hook)
