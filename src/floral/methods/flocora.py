"""FLoCoRA (Grativol Ribeiro et al., arXiv 2406.14082): LoRA from scratch on a frozen random
base shared by seed, with quantized messages.

Every client builds the same randomly initialized model from the experiment's seed, so the
base is never sent and never trained. What is trained and averaged (examples-weighted): the
LoRA factors of every adapted layer, the normalization layers' parameters, and the head (the
last Linear layer unless `head` names others), which is trained in full and gets no adaptor.

The messages are affine-quantized per output channel to 8, 4 or 2 bits, a setting of the run
so that the bytes are measured on the payload really sent:

    [method]
    name = "flocora"
    [comm]
    download = "quant:8"
    upload = "quant:8"

(`configs/comm-fmnist-rotate-flocora.toml`). With `model.init_from` the frozen base is a
pretrained one instead of a random one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase

from torch import nn

from floral.adapters.layers import NORM_TYPES
from floral.data import FederatedTask
from floral.errors import ConfigError
from floral.methods.adaptor_options import AdaptorOptions
from floral.methods.base import Role
from floral.methods.lora_common import LoraMethod, LoraOptions

__all__ = ["FLoCoRA", "FLoCoRAOptions", "head_layers"]


@dataclass
class FLoCoRAOptions(LoraOptions):
    head: list[str] = field(default_factory=list)  # module name patterns; empty = last Linear


def head_layers(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the modules trained in full: those matching `patterns`, or the last Linear."""
    if patterns:
        names = [n for n, _ in model.named_modules() if any(fnmatchcase(n, p) for p in patterns)]
        if not names:
            raise ConfigError(f"method.head: no module of the model matches {patterns}")
        return names
    linears = [name for name, module in model.named_modules() if type(module) is nn.Linear]
    if not linears:
        raise ConfigError("method.head: the model has no Linear layer; name its head")
    return linears[-1:]


class FLoCoRA(LoraMethod):
    name = "flocora"
    description = "LoRA, norms and head trained on a frozen random base; quantized messages."
    Options = FLoCoRAOptions
    batchable = True
    plain_mean = True
    mixture_mean = False
    secure_sum = True

    def build_model(self, model: nn.Module, task: FederatedTask) -> nn.Module:
        self.head = head_layers(model, self.options.head)
        self.trained_base = _own_parameter_names(model, self.head)
        return super().build_model(model, task)

    def adaptor_options(self, model: nn.Module) -> AdaptorOptions:
        inside = [f"{name}.*" for name in self.head]  # a head may be a block of layers
        return replace(self.options, exclude=[*self.options.exclude, *self.head, *inside])

    def base_role(self, name: str) -> Role:
        return Role.GLOBAL if name in self.trained_base else Role.FROZEN


def _own_parameter_names(model: nn.Module, head: list[str]) -> set[str]:
    """Parameters of the head modules and of every normalization layer (trained in full)."""
    names: set[str] = set()
    for module_name, module in model.named_modules():
        if module_name in head or isinstance(module, NORM_TYPES):
            prefix = f"{module_name}." if module_name else ""
            names.update(prefix + n for n, _ in module.named_parameters())
    return names
