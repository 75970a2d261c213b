"""Moving named tensors in and out of a model without rebuilding it."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "FROZEN_MARK",
    "OPTIMIZER_PREFIX",
    "WEIGHT_SUFFIX",
    "StateSlots",
    "TensorDict",
    "aligned",
    "frozen_module_names",
    "is_optimizer_key",
    "payload_bytes",
]

TensorDict = dict[str, torch.Tensor]
# An upload holds, for every global tensor `name`, a weighted delta and its weight under
# `name + WEIGHT_SUFFIX` (floral.methods.base); codecs send weights exact.
WEIGHT_SUFFIX = "::weight"
# A client's private state may also hold its local optimizer's state (AdamW's moments of its
# private tensors), under this prefix: kept between its rounds, never part of the model.
OPTIMIZER_PREFIX = "optimizer/"


# Where a tensor's data starts decides which kernel MKL's GEMM runs on some CPUs (AMD EPYC with
# AVX-512 among them): the same product of data starting 8 bytes off a 64-byte line differs
# from the aligned one in the last bit. Tensors torch allocates start on 64-byte lines; those
# read from a file or a message (safetensors aligns data to 8 bytes, NumPy buffers to 16) do
# not, so a client that read its state back would compute other bits than one that kept it.
ALIGNMENT = 64


def aligned(tensors: Mapping[str, torch.Tensor]) -> TensorDict:
    """The tensors, each copied into memory torch allocates unless it already starts on an
    `ALIGNMENT`-byte line: what comes from a file or a message computes as if never stored."""
    return {name: t if t.data_ptr() % ALIGNMENT == 0 else t.clone()
            for name, t in tensors.items()}


def is_optimizer_key(name: str) -> bool:
    return name.startswith(OPTIMIZER_PREFIX)


# A module that says of itself that none of its tensors ever trains or travels (a quantized
# base layer, whose packed weight and quantization statistics are no model state to average).
FROZEN_MARK = "floral_frozen"


def frozen_module_names(model: nn.Module) -> list[str]:
    """Names of the modules marked FROZEN_MARK (by floral.models.quantize)."""
    return [name for name, m in model.named_modules() if getattr(m, FROZEN_MARK, False)]


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
        """Copy `values` into the model's tensors (across devices if need be); entries of kept
        optimizer state (`OPTIMIZER_PREFIX`) are not the model's and are skipped."""
        for name, value in values.items():
            slot = self.tensors.get(name)
            if slot is None:
                if is_optimizer_key(name):
                    continue
                raise KeyError(f"model has no tensor named {name!r}")
            slot.copy_(value)

    @torch.no_grad()
    def snapshot(self, names: Iterable[str]) -> TensorDict:
        """Copies of the named tensors, on the CPU whatever the model's device."""
        return {name: self.tensors[name].detach().to("cpu", copy=True) for name in names}


def payload_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the tensors as they cross the network (their storage, not Python overhead)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())
