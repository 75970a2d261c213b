"""Datasets, registered by name: each declares the `[task]` options it reads, and how it checks
and builds its task.

An option outside a dataset's declaration would be silently ignored; the `[task]` reader and
`build_task` refuse it instead, naming the dataset and listing its options.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from floral.config import KeyScope
from floral.errors import ConfigError

if TYPE_CHECKING:
    from floral.data.task import FederatedTask, TaskConfig

__all__ = ["COMMON_OPTIONS", "DatasetEntry", "dataset_entry", "dataset_names", "register_dataset"]

# What every dataset reads: the federation's shape, and how much of each client's data trains.
# (`shift` too: datasets that are not labelled images take "none" alone, and say why.)
COMMON_OPTIONS: tuple[str, ...] = (
    "dataset", "shift", "num_clients", "num_clusters", "data_fraction", "min_samples"
)


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    options: tuple[str, ...]  # every `[task]` key it reads, the common ones first
    check: Callable[[TaskConfig], None]  # its own value checks, before any file is read
    build: Callable[[TaskConfig, int], FederatedTask]  # (config, seed) -> the task

    @property
    def scope(self) -> KeyScope:
        return KeyScope(f"dataset {self.name!r}", self.options)


_REGISTRY: dict[str, DatasetEntry] = {}


def register_dataset(
    name: str,
    options: tuple[str, ...],
    check: Callable[[TaskConfig], None],
    build: Callable[[TaskConfig, int], FederatedTask],
) -> None:
    """Make dataset `name` available; `options`: the keys it reads beyond COMMON_OPTIONS."""
    _REGISTRY[name] = DatasetEntry(name, (*COMMON_OPTIONS, *options), check, build)


def dataset_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def dataset_entry(name: str, key: str = "task.dataset") -> DatasetEntry:
    entry = _REGISTRY.get(name)
    if entry is None:
        raise ConfigError(f"{key}: unknown {name!r} (choose from {', '.join(_REGISTRY)})")
    return entry
