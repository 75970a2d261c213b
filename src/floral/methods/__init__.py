"""Federated methods, registered by name.

    >>> from floral.methods import get_method
    >>> method = get_method("floral", {"rank": 0.1})

A registry entry is a method class plus preset options, so variants such as `floral-oracle`
are the same code with different settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from floral.config import from_dict
from floral.errors import ConfigError
from floral.methods.base import WEIGHT_SUFFIX, ClientUpdate, Method, Role, weighted_mean_delta
from floral.methods.ensemble import Ensemble
from floral.methods.fdlora import FDLoRA
from floral.methods.fedavg import FedAvg
from floral.methods.fedit import FedIT
from floral.methods.fedsa_lora import FedSALoRA
from floral.methods.ffa_lora import FFALoRA
from floral.methods.flasc import FLASC
from floral.methods.flocora import FLoCoRA
from floral.methods.flora import FLoRA
from floral.methods.floral import Floral
from floral.methods.floral_em import FloralEM
from floral.methods.floral_seeded import FloralSeeded
from floral.methods.hetlora import HetLoRA
from floral.methods.local import LocalOnly
from floral.methods.local_adaptor import LocalAdaptor
from floral.methods.pfedlora import HeteroLocal, PFedLoRA

__all__ = [
    "WEIGHT_SUFFIX",
    "ClientUpdate",
    "Method",
    "MethodEntry",
    "Role",
    "check_method_switch",
    "get_method",
    "method_names",
    "register",
    "registry",
    "weighted_mean_delta",
]


@dataclass(frozen=True)
class MethodEntry:
    name: str
    cls: type[Method]
    description: str
    preset: Mapping[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, MethodEntry] = {}


def register(
    name: str, cls: type[Method], description: str | None = None, **preset: Any
) -> None:
    """Make `cls` (with `preset` options) available under `name`."""
    _REGISTRY[name] = MethodEntry(name, cls, description or cls.description, dict(preset))


def registry() -> dict[str, MethodEntry]:
    return dict(_REGISTRY)


def method_names() -> list[str]:
    return list(_REGISTRY)


def check_method_switch(before: str, table: Mapping[str, Any]) -> None:
    """A `[method]` table written for method `before` whose name was switched (`--set
    method.name=...`): one line naming every option the new method lacks."""
    entry = _REGISTRY.get(table.get("name", ""))
    if entry is None or table["name"] == before:
        return  # an unknown name is get_method's to report
    known = {f.name for f in dataclasses.fields(entry.cls.Options)}
    lacking = [k for k in table if k != "name" and k not in known]
    if lacking:
        raise ConfigError(
            f"method.name: {entry.name} lacks the option(s) {', '.join(lacking)} that [method] "
            f"sets for {before}; remove them from the file, or run floral compare CONFIG "
            f"--methods {entry.name}, which starts from {entry.name}'s own options"
        )


def get_method(name: str, options: Mapping[str, Any] | None = None) -> Method:
    """Build a registered method; `options` override its preset and are type-checked."""
    entry = _REGISTRY.get(name)
    if entry is None:
        raise ConfigError(f"method.name: unknown {name!r} (choose from {', '.join(_REGISTRY)})")
    merged = {**entry.preset, **(options or {})}
    if not dataclasses.fields(entry.cls.Options) and merged:
        raise ConfigError(f"method.{next(iter(merged))}: unknown key ({name} takes no options; "
                          f"remove {', '.join(f'method.{k}' for k in merged)})")
    method = entry.cls(from_dict(entry.cls.Options, merged, "method"))
    method.name = name  # type: ignore[misc]  # the registered name, e.g. "floral-oracle"
    return method


register("fedavg", FedAvg)
register("local", LocalOnly)
register("floral", Floral)
register(
    "floral-oracle",
    Floral,
    "FLoRAL with the router fixed one-hot on each client's true cluster.",
    router="oracle",
)
register("floral-em", FloralEM)
register("floral-seeded", FloralSeeded)
register("local-adaptor", LocalAdaptor)
register("ensemble", Ensemble)
register(
    "ensemble-oracle",
    Ensemble,
    "C full models, each client fixed on the model of its true cluster.",
    router="oracle",
)
register("fedit", FedIT)
register("ffa-lora", FFALoRA)
register("fedsa-lora", FedSALoRA)
register("flasc", FLASC)
register("flocora", FLoCoRA)
register("flora", FLoRA)
register("hetlora", HetLoRA)
register("pfedlora", PFedLoRA)
register("local-hetero", HeteroLocal)
register("fdlora", FDLoRA)
