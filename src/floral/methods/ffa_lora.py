"""FFA-LoRA (Sun et al., arXiv 2403.12313): A frozen at its random init, only B trained.

A is drawn once from the experiment's seed when the model is built, so every client holds the
same A without it ever being sent. With A fixed the mean of the B's is exact: (mean B) A is
the mean of the products B_k A. The adaptive bias, like B, is trained and averaged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from floral.methods.base import Role
from floral.methods.lora_common import LoraMethod

__all__ = ["FFALoRA"]


class FFALoRA(LoraMethod):
    name = "ffa-lora"
    description = "LoRA with A frozen at its seeded random init; only B trained and averaged."
    factor_roles: ClassVar[Mapping[str, Role]] = {"lora_A": Role.FROZEN}
    batchable = True
    plain_mean = True
    mixture_mean = False
    secure_sum = True
