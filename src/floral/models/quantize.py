"""A frozen base stored in 8 or 4 bits through bitsandbytes (`model.quantize = "int8" | "nf4"`).

Only linear layers whose weight (and bias) never train are quantized — a frozen base under
LoRA-style adaptors, QLoRA's setting; an adapted layer's `.base` included. Tied weights (a
language model's output head shares the embedding) stay as they are, and so do layers that
bitsandbytes cannot pack in 4 bits on a CPU (an input width not a multiple of its 64-number
blocks, an output width not a multiple of 32): real models' widths are. The quantized layers
compute in the run's `model.dtype`; the adaptors, routers and optimizer state stay float32.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from collections.abc import Collection
from typing import Any, Literal

import torch
from torch import nn

from floral.config import check_choice, choices
from floral.errors import ConfigError
from floral.train.state import FROZEN_MARK

__all__ = ["QUANTIZE", "Quantize", "check_quantize", "quantize_frozen"]

Quantize = Literal["none", "int8", "nf4"]
QUANTIZE: tuple[str, ...] = choices(Quantize)


def check_quantize(mode: str, device: torch.device) -> None:
    """A one-line error for a mode that does not exist, or cannot run on `device` here."""
    check_choice("model.quantize", mode, Quantize)
    if mode == "none":
        return
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(
            f"model.quantize = {mode!r}: bitsandbytes runs on cuda and cpu, not {device.type}"
        )
    _bitsandbytes(mode)


def quantize_frozen(
    model: nn.Module, frozen: Collection[str], mode: str, compute_dtype: torch.dtype
) -> list[str]:
    """Replace, in place, every plain nn.Linear whose tensors are all in `frozen` (and shared
    with no other module) by its bitsandbytes `mode` counterpart; returns their names."""
    if mode == "none":
        return []
    bnb = _bitsandbytes(mode)
    state = model.state_dict(keep_vars=True)
    uses: dict[int, int] = {}
    for tensor in state.values():
        uses[id(tensor)] = uses.get(id(tensor), 0) + 1
    names = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or not name:  # the root itself cannot be swapped
            continue
        own = [(f"{name}.{attr}", t) for attr, t in module._parameters.items() if t is not None]
        packable = mode != "nf4" or (module.out_features % 32 == 0
                                     and module.in_features % 64 == 0)
        if packable and all(key in frozen and uses[id(t)] == 1 for key, t in own):
            _replace(model, name, _quantized(bnb, module, mode, compute_dtype))
            names.append(name)
    return names


def _quantized(bnb: Any, linear: nn.Linear, mode: str, compute_dtype: torch.dtype) -> nn.Module:
    has_bias = linear.bias is not None
    weight = linear.weight.detach().float().cpu()
    if mode == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                    has_fp16_weights=False, threshold=6.0)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                  compute_dtype=compute_dtype, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().float().cpu(), requires_grad=False)
    setattr(layer, FROZEN_MARK, True)  # its packed weight and statistics never train or travel
    return layer.to("cpu")  # bitsandbytes quantizes when a layer is first moved


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, layer)


# bitsandbytes loggers that speak of its internals at every step (int8 inputs cast to fp16)
# or at import (an optional CPU kernel package): nothing a user of floral acts on.
_CHATTY_LOGGERS = ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops")


def _bitsandbytes(mode: str) -> Any:
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # bitsandbytes' CPU 4-bit kernel has no autograd registration, and torch warns at every
    # backward; the gradient it passes is that of the quantized weight
    # (tests/models/test_quantize.py checks it), which is what training over a frozen base needs.
    warnings.filterwarnings(
        "ignore", message="bitsandbytes::gemv_4bit: an autograd kernel was not registered"
    )
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError:
        raise ConfigError(
            f"model.quantize = {mode!r} needs bitsandbytes: pip install 'floral-lora[quantize]'"
        ) from None
