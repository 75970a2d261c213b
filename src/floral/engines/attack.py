"""Attacks, for experiments on robust aggregation: a seeded fraction of clients misbehave.

    [attack]
    kind = "sign-flip"   # none | sign-flip | scale | noise | label-flip
    fraction = 0.2       # of the clients, chosen by the run's seed, the same every round
    scale = 10.0         # sign-flip: send -scale x the update; scale: send scale x the update
    noise = 1.0          # noise: add N(0, noise^2) to every coordinate of the update

The attackers train as everyone does; their *upload* is corrupted in the client worker after
the step (sign-flip, scale, noise), or their *training labels* are flipped (label-flip:
y -> C - 1 - y, classification only). Test data stays clean, so the metrics say what the
attack did to the model every client gets. Everything is seeded: an attacked run repeats.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import numpy as np
import torch

from floral.config import Range, check_choice, check_ranges
from floral.data import FederatedTask
from floral.engines.driver import client_seed
from floral.errors import ConfigError
from floral.methods.base import ClientUpdate
from floral.train.state import WEIGHT_SUFFIX

__all__ = ["Attack", "AttackConfig", "AttackKind", "attackers", "check_attack"]

AttackKind = Literal["none", "sign-flip", "scale", "noise", "label-flip"]


@dataclass
class AttackConfig:
    """The `[attack]` table."""

    kind: AttackKind = "none"
    fraction: float = 0.0  # of the clients, in [0, 1)
    scale: float = 10.0  # sign-flip and scale: the factor
    noise: float = 1.0  # noise: the standard deviation added to every coordinate

    RANGES: ClassVar[dict[str, Range]] = {
        "fraction": Range("[0, 1)"),
        "scale": Range("(0, inf)"),
        "noise": Range("[0, inf)"),
    }


def check_attack(config: AttackConfig, task_kind: str | None = None) -> None:
    """One-line errors naming the key."""
    check_choice("attack.kind", config.kind, AttackKind)
    check_ranges(config, "attack")
    if config.kind != "none" and config.fraction == 0:
        raise ConfigError(f"attack.fraction: attack.kind = {config.kind!r} needs a fraction of "
                          "attacking clients above 0")
    if config.kind == "label-flip" and task_kind not in (None, "classification"):
        raise ConfigError(f"attack.kind: 'label-flip' needs a classification task, not a "
                          f"{task_kind} one")


def attackers(config: AttackConfig, num_clients: int, seed: int) -> frozenset[int]:
    """The attacking clients: round(fraction x clients) of them, drawn from the run's seed."""
    if config.kind == "none":
        return frozenset()
    count = round(config.fraction * num_clients)
    rng = np.random.default_rng([seed, 0xA77AC])
    return frozenset(int(k) for k in rng.choice(num_clients, size=count, replace=False))


class Attack:
    """What the attackers of one run do to their data and their uploads."""

    def __init__(self, config: AttackConfig, num_clients: int, seed: int) -> None:
        self.config, self.seed = config, seed
        self.clients = attackers(config, num_clients, seed)

    def poison(self, task: FederatedTask) -> FederatedTask:
        """The task with the attackers' training labels flipped (label-flip only)."""
        if self.config.kind != "label-flip" or not self.clients:
            return task
        check_attack(self.config, task.kind)
        top = task.num_outputs - 1
        clients = [replace(c, y_train=top - c.y_train) if c.client_id in self.clients else c
                   for c in task.clients]
        return replace(task, clients=clients)

    def corrupt(self, k: int, round_: int, update: ClientUpdate) -> ClientUpdate:
        """Client k's update as it sends it: corrupted if it attacks with its upload."""
        kind = self.config.kind
        if k not in self.clients or kind in ("none", "label-flip"):
            return update
        generator = torch.Generator().manual_seed(client_seed(self.seed ^ 0xA77AC, round_, k))
        upload = {}
        for name, value in update.upload.items():
            if name.endswith(WEIGHT_SUFFIX):
                upload[name] = value
            elif kind == "sign-flip":
                upload[name] = -self.config.scale * value
            elif kind == "scale":
                upload[name] = self.config.scale * value
            else:
                draw = torch.randn(value.shape, generator=generator, dtype=value.dtype)
                upload[name] = value + self.config.noise * draw
        return replace(update, upload=upload)
