"""Affine quantization per output channel to 8, 4, 2 or 1 bits, packed into bytes.

`quant:4` sends each floating tensor as unsigned b-bit codes q = round((x - lo) / s) with one
float32 offset lo and scale s = (hi - lo) / (2^b - 1) per channel (lo, hi: the channel's
minimum and maximum), so every number decodes to within s / 2 of its value. Codes are packed
8 / b to a byte; with the float32 shape that makes ceil(N b / 8) + 8 G + 4 ndim bytes for a
tensor of N numbers in G channels.

Channels are rows of the tensor as stored:
- an ordinary weight (out, in, ...) has one channel per output unit (axis 0), as for a
  conv's filters or a Linear's rows; a vector or a scalar is one channel;
- an adaptor factor `lora_A` (C, r, d_in...) or `lora_B` (C, r, d_out...) has one channel per
  adaptor and rank, a row of d numbers. For A that is its output channel; B is stored
  transposed, so a channel is one of B's r columns. Grouping B by its d_out outputs instead
  would spend 8 bytes of offset and scale on every r numbers, more than the codes themselves
  at small ranks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from floral.comm.payload import (
    PART_SEPARATOR,
    group_parts,
    shape_of,
    shape_tensor,
    split_exact,
)
from floral.errors import ConfigError
from floral.train.state import TensorDict

__all__ = ["AffineQuantizer", "channel_count", "pack_codes", "quant", "unpack_codes"]

BITS = (1, 2, 4, 8)
_PARTS = ("codes", "offset", "scale", "shape")
_RANK_FACTORS = ("lora_A", "lora_B")


def channel_count(name: str, shape: tuple[int, ...]) -> int:
    """How many channels (rows with their own offset and scale) a tensor is split into."""
    if len(shape) <= 1:
        return 1
    if name.rpartition(".")[2] in _RANK_FACTORS and len(shape) >= 3:
        return shape[0] * shape[1]
    return shape[0]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes < 2^bits, 8 / bits to a byte (the first in the lowest bits), zero-padded."""
    per_byte = 8 // bits
    if per_byte == 1:
        return codes
    padded = torch.nn.functional.pad(codes, (0, -len(codes) % per_byte))
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    return (padded.view(-1, per_byte) << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first `count` codes of `pack_codes`' output."""
    if bits == 8:
        return packed[:count]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    mask = (1 << bits) - 1
    return ((packed.unsqueeze(1) >> shifts) & mask).reshape(-1)[:count]


class AffineQuantizer:
    """b-bit affine codes per channel; weights and integer tensors are sent exact."""

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.levels = (1 << bits) - 1
        self.spec = f"quant:{bits}"

    def encode(self, tensors: Mapping[str, torch.Tensor]) -> TensorDict:
        lossy, payload = split_exact(tensors)
        for name, tensor in lossy.items():
            rows = tensor.detach().float().reshape(channel_count(name, tensor.shape), -1)
            low, high = rows.aminmax(dim=1)
            scale = (high - low) / self.levels
            # A constant channel decodes exactly from its offset; any nonzero scale will do.
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            codes = ((rows - low[:, None]) / scale[:, None]).round_().clamp_(0, self.levels)
            prefix = name + PART_SEPARATOR
            payload[prefix + "codes"] = pack_codes(codes.to(torch.uint8).reshape(-1), self.bits)
            payload[prefix + "offset"] = low
            payload[prefix + "scale"] = scale
            payload[prefix + "shape"] = shape_tensor(tensor)
        return payload

    def decode(self, payload: Mapping[str, torch.Tensor]) -> TensorDict:
        grouped, tensors = group_parts(payload, _PARTS)
        for name, parts in grouped.items():
            shape = shape_of(parts["shape"])
            codes = unpack_codes(parts["codes"], self.bits, math.prod(shape))
            rows = codes.float().reshape(len(parts["scale"]), -1)
            rows = torch.addcmul(parts["offset"][:, None], rows, parts["scale"][:, None])
            tensors[name] = rows.reshape(shape)
        return tensors


def quant(argument: str) -> AffineQuantizer:
    if argument not in {str(b) for b in BITS}:
        raise ConfigError(
            f"codec 'quant' needs a bit width ({', '.join(map(str, BITS))}), got {argument!r}"
        )
    return AffineQuantizer(int(argument))
