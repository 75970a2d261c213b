"""Flower run config <-> floral experiment: the keys a Flower app exposes, and how they map.

A Flower app's `[tool.flwr.app.config]` holds a floral experiment under floral's own dotted
names (`train.rounds`, `task.num_clients`, ...), so `flwr run --run-config 'train.rounds=20'`
means what `floral run --set train.rounds=20` means. Flower values are scalars only, so:

- a list is written as a string in TOML syntax: `model.hidden = "[64, 32]"`;
- `overrides` is a string of further floral `key=value` settings separated by spaces, for keys
  the app does not list (method options differ per method): `overrides = "method.rank=0.1"`;
- keys under `flower.` are this engine's own settings (`FlowerOptions`), not the experiment's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from floral.config import parse_value, set_dotted
from floral.errors import ConfigError

__all__ = [
    "FlowerOptions",
    "experiment_from_run_config",
    "options_from_run_config",
]

OVERRIDES_KEY = "overrides"
FLOWER_PREFIX = "flower."


@dataclass
class FlowerOptions:
    """Settings of the Flower engine itself (run-config keys `flower.<name>`, dashes allowed)."""

    # Seconds to wait for the replies of one wave of messages (a round's train, its evaluate);
    # rule: 10x the slowest wave measured, at least 60 (docs/deploy.md, "Timeouts").
    round_timeout: float = 600.0
    node_timeout: float = 600.0  # seconds to wait for every client's node to connect
    poll_interval: float = 0.05  # seconds between two pulls of replies from the SuperLink
    # Continue from the results folder's checkpoint: true (an error if there is none), "auto"
    # (when there is one of the same experiment), false (start afresh; an error over a run).
    resume: bool | str = False
    # Flower's secure aggregation (SecAgg+): the server learns only the sum of each round's
    # uploads, in which every value must lie within +-secagg_clip (floral.engines.flower.secagg).
    secagg: bool = False
    secagg_clip: float = 4096.0


def options_from_run_config(run_config: Mapping[str, Any]) -> FlowerOptions:
    """The `flower.*` keys of a run config as `FlowerOptions`; unknown keys are errors."""
    known = {f.name for f in fields(FlowerOptions)}
    values: dict[str, float] = {}
    resume: bool | str = False
    secagg = False
    for key, value in run_config.items():
        if not key.startswith(FLOWER_PREFIX):
            continue
        name = key[len(FLOWER_PREFIX) :].replace("-", "_")
        if name not in known:
            raise ConfigError(f"{key}: unknown key (known: {', '.join(sorted(known))})")
        if name == "resume":
            if not isinstance(value, bool) and value != "auto":
                raise ConfigError(f'{key}: expected true, false or "auto", got {value!r}')
            resume = value
            continue
        if name == "secagg":
            if not isinstance(value, bool):
                raise ConfigError(f"{key}: expected true or false, got {value!r}")
            secagg = value
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            what = "number" if name == "secagg_clip" else "number of seconds"
            raise ConfigError(f"{key}: expected a positive {what}, got {value!r}")
        values[name] = float(value)
    return FlowerOptions(**values, resume=resume, secagg=secagg)


def experiment_from_run_config(run_config: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(nested experiment data, floral `key=value` overrides) from a flat Flower run config.

    The caller resolves them with `floral.experiment.resolve_config`, which checks every key.
    """
    data: dict[str, Any] = {}
    overrides: list[str] = []
    for key, value in run_config.items():
        if key.startswith(FLOWER_PREFIX):
            continue
        if key == OVERRIDES_KEY:
            overrides.extend(_split_overrides(value))
            continue
        if isinstance(value, str) and value.lstrip().startswith("["):
            value = parse_value(value)  # lists travel as strings: Flower values are scalars
        set_dotted(data, key, value)
    return data, overrides


def _split_overrides(value: Any) -> list[str]:
    if not isinstance(value, str):
        raise ConfigError(f"{OVERRIDES_KEY}: expected a string of key=value settings")
    items = value.replace(";", " ").split()
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{OVERRIDES_KEY}: expected key=value, got {item!r}")
    return items
