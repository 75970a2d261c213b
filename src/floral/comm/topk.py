"""Top-k sparsification: the k largest-magnitude numbers of a message, as values and indices.

`topk:0.1` keeps k = max(1, round(0.1 * N)) of the N numbers of the whole message, chosen by
one magnitude threshold over all its tensors together (so a tensor of large updates keeps more
of its entries than one of small updates), as in FLASC. Each tensor is sent as float32 values,
int32 flat indices (ascending) and its shape: 8 bytes per kept number, so density d costs
about 2d of the dense bytes. The decoder puts zeros everywhere else.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from floral.comm.payload import (
    PART_SEPARATOR,
    float_argument,
    group_parts,
    shape_of,
    shape_tensor,
    split_exact,
)
from floral.train.state import TensorDict

__all__ = ["TopK", "kept_count", "topk"]

_PARTS = ("values", "indices", "shape")


def kept_count(total: int, density: float) -> int:
    """k for a message of `total` numbers: at least one number, at most all of them."""
    if total == 0:
        return 0
    return min(total, max(1, round(density * total)))


class TopK:
    """Keeps the k largest magnitudes of the message; everything else decodes to zero."""

    def __init__(self, density: float) -> None:
        self.density = density
        self.spec = f"topk:{density:g}"

    def encode(self, tensors: Mapping[str, torch.Tensor]) -> TensorDict:
        lossy, payload = split_exact(tensors)
        if not lossy:
            return payload
        flats = [t.detach().reshape(-1).float() for t in lossy.values()]
        sizes = [f.numel() for f in flats]
        everything = torch.cat(flats)
        k = kept_count(len(everything), self.density)
        # Sorted positions in the concatenation are grouped by tensor, ascending within each.
        kept = everything.abs().topk(k, sorted=False).indices.sort().values
        ends = torch.tensor(sizes).cumsum(0)
        counts = torch.bincount(torch.bucketize(kept, ends, right=True), minlength=len(sizes))
        starts = (ends - torch.tensor(sizes)).tolist()
        for (name, tensor), flat, start, chunk in zip(
            lossy.items(), flats, starts, kept.split(counts.tolist())
        ):
            local = chunk - start
            payload[name + PART_SEPARATOR + "values"] = flat[local]
            payload[name + PART_SEPARATOR + "indices"] = local.to(torch.int32)
            payload[name + PART_SEPARATOR + "shape"] = shape_tensor(tensor)
        return payload

    def decode(self, payload: Mapping[str, torch.Tensor]) -> TensorDict:
        grouped, tensors = group_parts(payload, _PARTS)
        for name, parts in grouped.items():
            shape = shape_of(parts["shape"])
            dense = torch.zeros(shape, dtype=parts["values"].dtype).reshape(-1)
            dense[parts["indices"].long()] = parts["values"]
            tensors[name] = dense.reshape(shape)
        return tensors


def topk(argument: str) -> TopK:
    return TopK(float_argument("topk", argument, 0.0, 1.0))
