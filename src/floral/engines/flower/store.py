"""Where a node keeps its clients' private tensors between messages: in memory, or on its disk.

A deployed ClientApp runs in a fresh process for every message, and a SuperNode, or the whole
federation, may be restarted between rounds. `DiskStore` keeps each client's private tensors
(FLoRAL's router, a local adaptor, kept optimizer moments) as safetensors files under the node's
own folder (node config `state-dir`; in a simulation, `nodes/` of the run's results folder),
one file per round the client trained, written aside and renamed into place:

    <state-dir>/<lineage>/client-<k>/round-<r>.safetensors

The lineage is a random name the server gives a run when it starts and keeps in its checkpoint,
so a resumed run finds its clients' state and a new run of the same experiment starts afresh.
Versions are kept by round because a resumed server goes back to its last checkpoint: training
round r reads the newest version before r, and versions from r on, written by a run that went
further than its checkpoint, are discarded. Older versions are removed once no checkpoint can
need them (`engine.checkpoint_every`, read from the experiment every message carries).

Lineages are bounded too: a node keeps the folders of its `keep-runs` most recently trained
runs (node config, default `KEEP_RUNS`; 0 keeps all). Every write marks its lineage as used
now, so a stopped run that is resumed counts as recent again as soon as it trains; the
lineage being written is never removed. A stopped run stays resumable on a node until
`keep-runs` other runs have trained there since.

`MemoryStore` keeps the latest tensors in Flower's `context.state`: one run only, as long as the
SuperNode lives.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from floral.errors import ConfigError
from floral.train.state import TensorDict, aligned

__all__ = ["KEEP_RUNS", "DiskStore", "PrivateStore", "keep_from", "prune_lineages",
           "valid_lineage"]

KEEP_RUNS = 3  # lineages a node keeps by default: the current run and two it may resume

_LINEAGE = re.compile(r"[0-9a-f]{32}")
_VERSION = re.compile(r"round-(\d+)\.safetensors")


def valid_lineage(lineage: str) -> bool:
    """A lineage is 32 hex digits: it names a folder, so nothing else may come from a message."""
    return _LINEAGE.fullmatch(lineage) is not None


def keep_from(round_: int, checkpoint_every: int) -> int:
    """The newest round a resumed server may go back to while it trains `round_`: its last
    regular checkpoint (every `checkpoint_every` rounds), or the round before, where a run that
    diverged or was interrupted writes its checkpoint."""
    if checkpoint_every <= 0:
        return round_ - 1
    return min(round_ - 1, (round_ - 1) // checkpoint_every * checkpoint_every)


class PrivateStore(Protocol):
    kind: str  # "disk" or "memory", reported to the server

    def read(self, k: int, round_: int) -> TensorDict | None:
        """Client k's private tensors as they stood after round `round_` (None: never trained)."""
        ...

    def write(self, k: int, round_: int, tensors: Mapping[str, torch.Tensor], keep: int) -> None:
        """Client k's tensors after training round `round_`; versions the server can no longer
        go back to (before round `keep`) may be dropped."""
        ...


class DiskStore:
    """Private tensors as safetensors under `root / lineage / client-<k>`."""

    kind = "disk"

    def __init__(self, root: Path, lineage: str, keep_runs: int = KEEP_RUNS) -> None:
        if not valid_lineage(lineage):
            raise ValueError(f"lineage {lineage!r} is not 32 hex digits")
        self.root, self.lineage, self.keep_runs = root, lineage, keep_runs
        self.folder = root / lineage

    def _versions(self, k: int) -> dict[int, Path]:
        folder = self.folder / f"client-{k}"
        if not folder.is_dir():
            return {}
        found = {}
        for path in folder.iterdir():
            match = _VERSION.fullmatch(path.name)
            if match:
                found[int(match.group(1))] = path
        return found

    def read(self, k: int, round_: int) -> TensorDict | None:
        versions = [r for r in self._versions(k) if r <= round_]
        if not versions:
            return None
        path = self._versions(k)[max(versions)]
        try:
            return aligned(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as error:
            raise ConfigError(
                f"{path}: this node's private state cannot be read ({error})"
            ) from None

    def write(self, k: int, round_: int, tensors: Mapping[str, torch.Tensor], keep: int) -> None:
        folder = self.folder / f"client-{k}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"round-{round_}.safetensors"
        tmp = folder / f".{path.name}.{os.getpid()}.tmp"
        save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, str(tmp))
        os.replace(tmp, path)
        versions = self._versions(k)
        kept = max((r for r in versions if r <= keep), default=None)
        for r, old in versions.items():
            # Later rounds belong to a run that went past the server's checkpoint; older ones
            # than the newest a checkpoint may need are no longer needed.
            if r > round_ or (kept is not None and r < kept):
                old.unlink(missing_ok=True)
        os.utime(self.folder)  # this lineage was used now: the pruning below ranks by it
        prune_lineages(self.root, self.lineage, self.keep_runs)


def prune_lineages(root: Path, current: str, keep: int) -> list[str]:
    """Remove all but the `keep` most recently used lineage folders under `root` (0: none
    removed), never `current`; the names removed. Only folders named as lineages are touched:
    the warm worker's files and anything else in a node's folder stay."""
    if keep <= 0 or not root.is_dir():
        return []
    used = []
    for path in root.iterdir():
        if path.name != current and valid_lineage(path.name) and path.is_dir():
            try:
                used.append((path.stat().st_mtime_ns, path.name))
            except FileNotFoundError:  # removed meanwhile by another process of this node
                continue
    removed = []
    for _, name in sorted(used, reverse=True)[max(keep - 1, 0):]:
        # Renamed first, so no reader ever sees half a lineage; then deleted at leisure.
        aside = root / f".removed-{name}.{os.getpid()}"
        try:
            os.replace(root / name, aside)
        except FileNotFoundError:
            continue
        shutil.rmtree(aside, ignore_errors=True)
        removed.append(name)
    return removed
