"""What all lossy codecs share: which tensors stay exact, and how encoded parts are named.

A payload is a flat dict of tensors. A lossy codec stores tensor `name` as a few parts named
`name::<part>` (values, indices, shape, ...); tensors it leaves exact keep their own name.

Aggregation weights (names ending in `WEIGHT_SUFFIX`) and non-floating tensors are always sent
exact (dense, in their own dtype): a weight is one number per tensor (or per adaptor), so it
costs nothing to send exactly, while a rounded weight would bias the server's mean and float16
overflows above 65504 examples.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from floral.errors import ConfigError
from floral.train.state import WEIGHT_SUFFIX, TensorDict

__all__ = [
    "PART_SEPARATOR",
    "float_argument",
    "group_parts",
    "is_exact",
    "no_argument",
    "shape_of",
    "shape_tensor",
    "split_exact",
]

PART_SEPARATOR = "::"


def is_exact(name: str, tensor: torch.Tensor) -> bool:
    """Whether a codec must send `tensor` as it is (weights, integer tensors, empty tensors)."""
    return name.endswith(WEIGHT_SUFFIX) or not tensor.is_floating_point() or tensor.numel() == 0


def split_exact(tensors: Mapping[str, torch.Tensor]) -> tuple[TensorDict, TensorDict]:
    """(tensors to compress, tensors to send exact), each in the message's order."""
    lossy: TensorDict = {}
    exact: TensorDict = {}
    for name, tensor in tensors.items():
        (exact if is_exact(name, tensor) else lossy)[name] = tensor
    return lossy, exact


def shape_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The shape as int32, so that a decoder needs nothing but the payload."""
    return torch.tensor(tensor.shape, dtype=torch.int32)


def shape_of(part: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(n) for n in part.tolist())


def group_parts(
    payload: Mapping[str, torch.Tensor], parts: tuple[str, ...]
) -> tuple[dict[str, dict[str, torch.Tensor]], TensorDict]:
    """Encoded tensors as {name: {part: tensor}}, and the tensors that were sent exact."""
    suffixes = {PART_SEPARATOR + part: part for part in parts}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    exact: TensorDict = {}
    for key, tensor in payload.items():
        name, sep, part = key.rpartition(PART_SEPARATOR)
        if sep and sep + part in suffixes:
            grouped.setdefault(name, {})[part] = tensor
        else:
            exact[key] = tensor
    return grouped, exact


def float_argument(codec: str, argument: str, low: float, high: float) -> float:
    """A codec's numeric argument in (low, high], or a one-line error."""
    try:
        value = float(argument)
    except ValueError:
        value = float("nan")
    if not low < value <= high:
        raise ConfigError(
            f"codec {codec!r} needs a number in ({low:g}, {high:g}], got {argument!r}"
        )
    return value


def no_argument(codec: str, argument: str) -> None:
    if argument:
        raise ConfigError(f"codec {codec!r} takes no argument, got {argument!r}")
