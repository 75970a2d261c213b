"""FedSA-LoRA (Guo et al., arXiv 2410.01463): A shared, B private.

A learns what clients have in common and is averaged; B (and the adaptive bias) stays with
each client, so every client's model is personal. A client not yet sampled has B = 0, i.e.
the base model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from floral.methods.base import Role
from floral.methods.lora_common import LoraMethod

__all__ = ["FedSALoRA"]


class FedSALoRA(LoraMethod):
    name = "fedsa-lora"
    description = "LoRA with A shared (averaged) and B kept private by each client."
    factor_roles: ClassVar[Mapping[str, Role]] = {
        "lora_B": Role.PRIVATE,
        "lora_bias": Role.PRIVATE,
    }
    batchable = True
    plain_mean = True
    mixture_mean = False
    secure_sum = True
