"""The paths an experiment names (its data, tokenizer, model and initial weights), made absolute
so that a results folder says exactly what it read, from whatever folder it is later used.

A relative path in an experiment file is read relative to the file's folder; one that exists
only relative to the current folder (as configs/*.toml name `data/mnist` from the repository's
root) is still found there. A relative path given on the command line (`--set`) is relative to
the current folder. A value that names nothing on disk (a hub id such as `hf:owner/model`, a
built-in name such as `smollm2`, a missing file) stays as written, and the data's own check
names it.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["PATH_KEYS", "absolute_path", "absolute_paths", "comparable_paths", "resolve_paths"]

HF_PREFIX = "hf:"
# (table, key) of every setting that may name a file or folder.
PATH_KEYS: tuple[tuple[str, str], ...] = (
    ("task", "data_dir"), ("task", "source"), ("task", "tokenizer"), ("model", "name"),
    ("model", "init_from"),
)
# Values of those settings that are names, never paths.
_NAMES = frozenset({"", "bytes", "smollm2", "hf:smollm2", "auto"})


def absolute_path(value: str, *folders: Path) -> str:
    """`value` (a path, or `hf:<path>`) made absolute against the first of `folders` in which
    it exists; unchanged when it is absolute already, or exists in none of them."""
    if value in _NAMES:
        return value
    prefix = HF_PREFIX if value.startswith(HF_PREFIX) else ""
    path = Path(value[len(prefix):])
    if not path.parts or path.is_absolute() or value[len(prefix):].startswith("~"):
        return value
    for folder in folders:
        candidate = folder / path
        if candidate.exists():
            return prefix + os.path.abspath(candidate)
    return value


def resolve_paths(tables: Mapping[str, Any], folder: Path) -> dict[str, Any]:
    """An experiment file's tables with its relative paths made absolute: against `folder`
    (the file's), else against the current folder."""
    out = copy.deepcopy(dict(tables))
    for table, key in PATH_KEYS:
        section = out.get(table)
        if isinstance(section, dict) and isinstance(section.get(key), str):
            section[key] = absolute_path(section[key], folder, Path.cwd())
    return out


def absolute_paths(config: Any) -> None:
    """The relative paths left in a checked `ExperimentConfig` (set on the command line, or in
    code) made absolute against the current folder, where they were found."""
    for table, key in PATH_KEYS:
        section = getattr(config, table)
        setattr(section, key, absolute_path(getattr(section, key), Path.cwd()))


def comparable_paths(tables: dict[str, Any]) -> dict[str, Any]:
    """A config's tables (`ExperimentConfig.to_dict()`, changed in place) with its relative
    paths made absolute against the current folder, where a run that recorded them (before
    floral recorded paths absolute) read them: so that its checkpoint resumes, and its
    finished run is not run again, when the same files are now named absolute."""
    for table, key in PATH_KEYS:
        section = tables.get(table)
        if isinstance(section, dict) and isinstance(section.get(key), str):
            section[key] = absolute_path(section[key], Path.cwd())
    return tables
