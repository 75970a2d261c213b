"""Half precision: every floating tensor sent as float16 or bfloat16 (2 bytes per number).

float16 keeps 10 mantissa bits but overflows above 65504; bfloat16 keeps float32's range with
7 mantissa bits. Weights and integer tensors are sent exact (see `floral.comm.payload`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from floral.comm.payload import is_exact, no_argument
from floral.train.state import TensorDict

__all__ = ["HalfPrecision", "bf16", "fp16"]


class HalfPrecision:
    """Casts floating tensors to a 2-byte dtype on the way out and back to float32 on arrival."""

    def __init__(self, dtype: torch.dtype, spec: str) -> None:
        self.dtype, self.spec = dtype, spec

    def encode(self, tensors: Mapping[str, torch.Tensor]) -> TensorDict:
        return {n: t if is_exact(n, t) else t.to(self.dtype) for n, t in tensors.items()}

    def decode(self, payload: Mapping[str, torch.Tensor]) -> TensorDict:
        return {n: t.float() if t.dtype == self.dtype else t for n, t in payload.items()}


def fp16(argument: str = "") -> HalfPrecision:
    no_argument("fp16", argument)
    return HalfPrecision(torch.float16, "fp16")


def bf16(argument: str = "") -> HalfPrecision:
    no_argument("bf16", argument)
    return HalfPrecision(torch.bfloat16, "bf16")
