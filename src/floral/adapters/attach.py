"""Attach adaptors to a model, merge them back, and name what was added."""

from __future__ import annotations

import copy
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import cast

import torch
from torch import Tensor, nn

from floral.adapters.layers import (
    NORM_TYPES,
    AdaptedConv2d,
    AdaptedEmbedding,
    AdaptedLayer,
    AdaptedLinear,
    AdaptedNorm,
    factor_sizes,
)
from floral.adapters.rank import resolve_rank
from floral.adapters.router import Router, close_router_hook, refresh_router_hook
from floral.adapters.spec import AdapterSpec
from floral.errors import ConfigError

__all__ = [
    "AdaptorTable",
    "adaptor_table",
    "attach",
    "merge",
    "adaptor_parameter_names",
    "router_parameter_names",
    "mixture_weights",
    "adapted_layers",
]

ROUTER_ATTRIBUTE = "floral_router"

_TYPES_BY_NAME: dict[str, tuple[type[nn.Module], ...]] = {
    "linear": (nn.Linear,),
    "conv2d": (nn.Conv2d,),
    "embedding": (nn.Embedding,),
    "norm": NORM_TYPES,
}


def attach(model: nn.Module, spec: AdapterSpec) -> nn.Module:
    """Give `model` (in place) C adaptors on every layer `spec` selects; returns `model`.

    Each selected layer is replaced by its adapted wrapper, which keeps the layer as `.base`
    (`fc.weight` becomes `fc.base.weight`). With C > 1 the model gets a `floral_router`
    (a Router; in an nn.Sequential it is the last child, and passes its input through), a
    forward pre-hook that draws pi once per forward, and a forward hook that ends that pi's
    forward (so compiled code knows when the pi is current). Layers are matched by
    exact type (subclasses may have their own forward), so e.g. the output projection of
    nn.MultiheadAttention is left alone. Outputs are unchanged until the adaptors are trained.
    """
    spec.validate()
    if hasattr(model, ROUTER_ATTRIBUTE) or adapted_layers(model):
        raise ConfigError("attach: the model already has adaptors attached")
    targets = _select_layers(model, spec)
    if not targets:
        raise ConfigError(
            f"layer_types = {list(spec.layer_types)!r}, include = {list(spec.include)!r}, "
            f"exclude = {list(spec.exclude)!r}: no layer of the model is selected"
        )
    wrappers = {
        id(module): _adapt(names[0], module, spec, index)
        for index, (names, module) in enumerate(targets)
    }
    router = None
    if spec.num_adaptors > 1:
        router = Router(spec.num_adaptors, spec.router, num_layers=len(targets))
        reference = _reference_tensor(targets[0][1])
        if reference is not None:
            router.to(reference)
    for names, module in targets:
        wrapper = wrappers[id(module)]
        wrapper.bind_router(router)
        for name in names:
            _set_submodule(model, name, wrapper)
    if router is not None:
        setattr(model, ROUTER_ATTRIBUTE, router)
        model.register_forward_pre_hook(refresh_router_hook)
        model.register_forward_hook(close_router_hook, always_call=True)
    return model


def merge(model: nn.Module, router_weights: Tensor | None = None) -> nn.Module:
    """A new plain model: every adapted layer folded back into its own layer type.

    pi is the eval-mode pi (no noise) of each layer, or `router_weights` of shape (C,) or
    (L, C) if given. The copy has no router and no hook; its outputs equal the adapted
    model's for that pi.
    """
    layers = adapted_layers(model)
    if not layers:
        raise ConfigError("merge: the model has no adaptors attached")
    merged = copy.deepcopy(model)
    # Every name of every adapted layer, taken before any is replaced.
    paths = [(n, m) for n, m in merged.named_modules(remove_duplicate=False) if n]
    folded: dict[int, nn.Module] = {}
    for name, module in paths:
        if isinstance(module, AdaptedLayer):
            if id(module) not in folded:
                folded[id(module)] = module.fold(_merge_weights(module, router_weights))
            _set_submodule(merged, name, folded[id(module)])
    _detach_router(merged)
    return merged


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    """Qualified name -> adapted layer, each layer once (under its first name)."""
    return {
        name: module for name, module in model.named_modules() if isinstance(module, AdaptedLayer)
    }


def adaptor_parameter_names(model: nn.Module) -> list[str]:
    """Names (as in model.named_parameters()) of all adaptor tensors, each (C, ...)."""
    return list(_adaptor_parameters(model))


def router_parameter_names(model: nn.Module) -> list[str]:
    """Names (as in model.named_parameters()) of the router logits; empty when C == 1."""
    router_ids = {id(p) for m in model.modules() if isinstance(m, Router) for p in m.parameters()}
    return [name for name, p in model.named_parameters() if id(p) in router_ids]


def mixture_weights(model: nn.Module) -> dict[str, Tensor]:
    """Adaptor parameter name -> the pi (C,) its layer uses in eval mode, detached."""
    pis: dict[int, Tensor] = {}  # one draw per layer, shared by its tensors
    weights = {}
    for name, layer in adaptor_table(model).layers.items():
        if id(layer) not in pis:
            pis[id(layer)] = layer.eval_mixture()
        weights[name] = pis[id(layer)]
    return weights


@dataclass(eq=False)
class AdaptorTable:
    """A model's adaptor tensors: name (as in named_parameters()) -> its layer and its number
    of axes, and the router with its name prefix (None when C == 1)."""

    layers: dict[str, AdaptedLayer]
    ndims: dict[str, int]
    router: tuple[Router, str] | None
    # (the owner's parameter dict, local name, the parameter) of every entry: the table is
    # current while each is still there.
    found: Sequence[tuple[Mapping, str, Tensor]]

    def current(self) -> bool:
        return all(table.get(attr) is value for table, attr, value in self.found)


# Tables already found, per model. A model's adapted layers never change after `attach` (which
# refuses a model that has some; `merge` works on a copy), so a table holds while its tensors
# are the model's own: checked on every use instead of walking the modules, which cost more
# than the rest of a client's upload on small models.
_TABLES: weakref.WeakKeyDictionary[nn.Module, AdaptorTable] = weakref.WeakKeyDictionary()


def adaptor_table(model: nn.Module) -> AdaptorTable:
    """The model's `AdaptorTable`, found once per model."""
    table = _TABLES.get(model)
    if table is None or not table.current():
        table = _find_adaptors(model)
        if table.layers:  # a model without adaptors yet may get them
            _TABLES[model] = table
    return table


def _find_adaptors(model: nn.Module) -> AdaptorTable:
    owner: dict[int, tuple[AdaptedLayer, str]] = {}
    for layer in adapted_layers(model).values():
        for local, parameter in layer.adaptor_parameters().items():
            owner[id(parameter)] = (layer, local)
    layers, ndims, found = {}, {}, []
    for name, parameter in model.named_parameters():
        if id(parameter) in owner:
            layer, local = owner[id(parameter)]
            layers[name], ndims[name] = layer, parameter.dim()
            found.append((layer._parameters, local, parameter))
    routers = [(m, f"{n}.") for n, m in model.named_modules() if isinstance(m, Router)]
    return AdaptorTable(layers, ndims, routers[0] if len(routers) == 1 else None, found)


def _adaptor_parameters(model: nn.Module) -> dict[str, AdaptedLayer]:
    """Adaptor parameter name -> its layer, in named_parameters() order."""
    return adaptor_table(model).layers


def _select_layers(model: nn.Module, spec: AdapterSpec) -> list[tuple[list[str], nn.Module]]:
    """Selected layers with every name they go by (a shared layer is adapted once)."""
    wanted = tuple(t for name in spec.layer_types for t in _TYPES_BY_NAME[name])
    selected: dict[int, tuple[list[str], nn.Module]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if not name or type(module) not in wanted:
            continue
        if id(module) in selected:
            selected[id(module)][0].append(name)
        elif _name_selected(name, spec):
            selected[id(module)] = ([name], module)
    return list(selected.values())


def _name_selected(name: str, spec: AdapterSpec) -> bool:
    if spec.include and not any(fnmatchcase(name, p) for p in spec.include):
        return False
    return not any(fnmatchcase(name, p) for p in spec.exclude)


def _adapt(name: str, module: nn.Module, spec: AdapterSpec, index: int) -> AdaptedLayer:
    count, alpha = spec.slots, spec.alpha
    if isinstance(module, NORM_TYPES):
        return AdaptedNorm(module, count, alpha, layer_index=index)
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        raise ConfigError(
            f"layer {name!r}: conv2d with groups={module.groups} cannot be adapted "
            "(only groups=1); exclude it"
        )
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        raise ConfigError(f"layer {name!r}: an embedding with max_norm cannot be adapted")
    d_in, d_out = factor_sizes(module, spec.conv_form)
    rank = resolve_rank(spec.rank, d_in, d_out, spec.min_rank, layer=name)
    if isinstance(module, nn.Linear):
        return AdaptedLinear(module, count, rank, alpha, spec.bias, layer_index=index)
    if isinstance(module, nn.Conv2d):
        return AdaptedConv2d(module, count, rank, alpha, spec.bias, spec.conv_form, index)
    # factor_sizes accepted the module, so it is an embedding.
    return AdaptedEmbedding(cast(nn.Embedding, module), count, rank, alpha, layer_index=index)


def _merge_weights(layer: AdaptedLayer, router_weights: Tensor | None) -> Tensor:
    if router_weights is None:
        return layer.eval_mixture()
    reference = next(iter(layer.adaptor_parameters().values()))
    weights = torch.as_tensor(router_weights).to(reference)
    count = layer.num_adaptors
    if weights.dim() == 2 and weights.shape[1] == count and layer.layer_index < weights.shape[0]:
        return weights[layer.layer_index]
    if tuple(weights.shape) != (count,):
        raise ConfigError(
            f"router_weights of shape {tuple(weights.shape)}: expected ({count},) or (L, {count})"
        )
    return weights


def _detach_router(model: nn.Module) -> None:
    if hasattr(model, ROUTER_ATTRIBUTE):
        delattr(model, ROUTER_ATTRIBUTE)
    pre_hooks, hooks = model._forward_pre_hooks, model._forward_hooks
    for key in [k for k, hook in pre_hooks.items() if hook is refresh_router_hook]:
        del pre_hooks[key]
    for key in [k for k, hook in hooks.items() if hook is close_router_hook]:
        del hooks[key]
        model._forward_hooks_always_called.pop(key, None)


def _reference_tensor(module: nn.Module) -> Tensor | None:
    parameter = next(iter(module.parameters()), None)
    return parameter if parameter is not None else next(iter(module.buffers()), None)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, module)
