"""Local training only: every client trains its own model and nothing is shared (a reference)."""

from __future__ import annotations

from torch import nn

from floral.methods.base import Method, Role

__all__ = ["LocalOnly"]


class LocalOnly(Method):
    name = "local"
    description = "No federation: each client trains its own model on its own data (reference)."
    batchable = True
    plain_mean = True
    mixture_mean = False
    secure_sum = True

    def roles(self, model: nn.Module) -> dict[str, Role]:
        return {name: Role.PRIVATE for name in model.state_dict()}
