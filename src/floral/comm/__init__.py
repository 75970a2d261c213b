"""What crosses the network: codecs for downloads and uploads, with bytes measured on the payload.

A codec turns a dict of named tensors into a payload (another flat dict of tensors, so any
engine can carry it: safetensors, Flower `ArrayRecord`s) and back. Bytes are always counted on
the encoded payload. Engines call `Channel.send`, which encodes, counts and decodes.

    [comm]
    download = "dense"
    upload = "topk:0.1"

Codecs (one module each): `dense` (float32, lossless), `fp16` and `bf16` (`floral.comm.half`),
`topk:<density>` (`floral.comm.topk`), `quant:<bits>` with 8, 4, 2 or 1 bits
(`floral.comm.quant`). Aggregation weights (`::weight` tensors) and integer tensors are always
sent exact (`floral.comm.payload`). A spec may also be written without the colon (`topk0.1`,
`quant8`), which fits where colons already separate things, as in
`floral compare --methods flasc:comm.upload=topk0.1`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from floral.comm.half import bf16, fp16
from floral.comm.quant import quant
from floral.comm.topk import topk
from floral.errors import ConfigError
from floral.train.state import TensorDict, payload_bytes

__all__ = [
    "Channel",
    "Codec",
    "CommConfig",
    "Dense",
    "build_codec",
    "codec_names",
    "register_codec",
]


class Codec(Protocol):
    """Encodes named tensors into a payload of tensors and decodes it back."""

    spec: str

    def encode(self, tensors: Mapping[str, torch.Tensor]) -> TensorDict: ...

    def decode(self, payload: Mapping[str, torch.Tensor]) -> TensorDict: ...


class Dense:
    """Tensors as they are (float32): lossless."""

    spec = "dense"

    def encode(self, tensors: Mapping[str, torch.Tensor]) -> TensorDict:
        return dict(tensors)

    def decode(self, payload: Mapping[str, torch.Tensor]) -> TensorDict:
        return dict(payload)


@dataclass
class CommConfig:
    """The `[comm]` table: one codec spec for each direction."""

    download: str = "dense"
    upload: str = "dense"


def _dense(argument: str) -> Dense:
    if argument:
        raise ConfigError(f"codec 'dense' takes no argument, got {argument!r}")
    return Dense()


_CODECS: dict[str, Callable[[str], Codec]] = {
    "dense": _dense,
    "fp16": fp16,
    "bf16": bf16,
    "topk": topk,
    "quant": quant,
}
_COMPACT = re.compile(r"([a-z_]+)([0-9.]+)")


def register_codec(name: str, factory: Callable[[str], Codec]) -> None:
    """`factory(argument)` builds the codec for specs "name" or "name:argument"."""
    _CODECS[name] = factory


def codec_names() -> list[str]:
    return list(_CODECS)


def build_codec(spec: str, key: str = "comm") -> Codec:
    """A codec from its spec string, e.g. "dense"; `key` names the setting in errors."""
    name, _, argument = spec.partition(":")
    compact = _COMPACT.fullmatch(spec)
    if name not in _CODECS and compact:
        name, argument = compact.groups()
    factory = _CODECS.get(name)
    if factory is None:
        raise ConfigError(f"{key}: unknown codec {spec!r} (choose from {', '.join(_CODECS)})")
    try:
        return factory(argument)
    except ConfigError as error:
        raise ConfigError(f"{key}: {error}") from None


class Channel:
    """One direction of the link: encode, count the payload's bytes, decode."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec

    def send(self, tensors: Mapping[str, torch.Tensor]) -> tuple[TensorDict, int]:
        payload = self.codec.encode(tensors)
        return self.codec.decode(payload), payload_bytes(payload)
