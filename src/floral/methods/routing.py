"""What every method with a per-client router shares: its modes, roles and oracle state.

A router is `learned` (its logits are private and trained) or `oracle` (fixed one-hot on the
client's true cluster; the fixed weights are the private state and the logits are frozen).
"""

from __future__ import annotations

from typing import Literal

import torch

from floral.adapters import Router
from floral.config import check_choice, choices
from floral.methods.base import Role
from floral.train.state import TensorDict

__all__ = [
    "ROUTER_MODES",
    "ROUTER_PREFIX",
    "RouterMode",
    "check_router_mode",
    "oracle_private",
    "oracle_weights",
    "prepare_oracle",
    "router_roles",
]

ROUTER_PREFIX = "floral_router."
RouterMode = Literal["learned", "oracle"]
ROUTER_MODES: tuple[str, ...] = choices(RouterMode)


def check_router_mode(mode: str) -> None:
    check_choice("method.router", mode, RouterMode)


def prepare_oracle(router: Router) -> None:
    """Give the fixed weights their full shape now; each client's one-hot is private state."""
    logits = router.logits
    router.fix(torch.full_like(logits, 1.0 / logits.shape[-1]))
    logits.requires_grad_(False)


def router_roles(roles: dict[str, Role], oracle: bool) -> dict[str, Role]:
    """Private: the learned logits, or the oracle's fixed weights; the other one is frozen."""
    private = ROUTER_PREFIX + ("fixed" if oracle else "logits")
    for name in roles:
        if name.startswith(ROUTER_PREFIX):
            roles[name] = Role.PRIVATE if name == private else Role.FROZEN
    return roles


def oracle_private(private: TensorDict, cluster: int) -> TensorDict:
    """The client's private state with its router fixed on its true cluster."""
    fixed = private[ROUTER_PREFIX + "fixed"]
    private[ROUTER_PREFIX + "fixed"] = oracle_weights(fixed, cluster)
    return private


def oracle_weights(like: torch.Tensor, cluster: int) -> torch.Tensor:
    """One-hot on adaptor `cluster mod C`, in the shape of the router's fixed weights."""
    num_adaptors = like.shape[-1]
    one_hot = torch.zeros(num_adaptors, dtype=like.dtype)
    one_hot[cluster % num_adaptors] = 1.0
    return one_hot.expand_as(like).clone()
