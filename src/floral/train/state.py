"""Moving named tensors in and out of a model without rebuilding it."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["WEIGHT_SUFFIX", "StateSlots", "TensorDict", "payload_bytes"]

TensorDict = dict[str, torch.Tensor]
# An upload holds, for every global tensor `name`, a weighted delta and its weight under
# `name + WEIGHT_SUFFIX` (floral.methods.base); codecs send weights exact.
WEIGHT_SUFFIX = "::weight"


class StateSlots:
    """Named views of a model's parameters and buffers, for fast loading and snapshots.

    A federated engine loads a different client's tensors into the same model many times per
    round; `load_state_dict` re-walks the module tree each time, a cached name -> tensor map
    does not.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.tensors: dict[str, torch.Tensor] = dict(model.state_dict(keep_vars=True))
        self._memo: dict[Hashable, Any] = {}

    def memo(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """Something derived from the model's structure (parameter groups, an optimizer),
        built once per model instead of once per client step."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def names(self) -> list[str]:
        return list(self.tensors)

    @torch.no_grad()
    def load(self, values: Mapping[str, torch.Tensor]) -> None:
        for name, value in values.items():
            slot = self.tensors.get(name)
            if slot is None:
                raise KeyError(f"model has no tensor named {name!r}")
            slot.copy_(value)

    @torch.no_grad()
    def snapshot(self, names: Iterable[str]) -> TensorDict:
        return {name: self.tensors[name].detach().clone() for name in names}


def payload_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the tensors as they cross the network (their storage, not Python overhead)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())
