"""A node's built task, kept on its disk: a fresh ClientApp process loads it instead of building.

A deployed ClientApp without a warm worker starts in a fresh process for every message and
builds the task from the experiment (and the node's own files) every time: tokenizing a jsonl
file, generating a synthetic task, reading and normalizing images. The built task is a pure
function of the task config, the seed, the node's own data (`data-path`, or `task.data_dir`)
and floral's data code, so a node with a `state-dir` keeps it there, keyed by all of these:

    <state-dir>/task-cache/<key>.safetensors   every client's tensors (and the task's extras)
    <state-dir>/task-cache/<key>.json          the rest: shape, clusters, held-out prompts

Files are identified by name, size and modification time (hashing a large data set on every
message would cost what the cache saves); a changed config, seed, data file or floral version
gives another key, and an unreadable or inconsistent entry is built again and rewritten. Both
files are written aside and renamed into place, the JSON last: an entry without its JSON, or
whose JSON names other tensors, is not used. At most `MAX_ENTRIES` entries are kept. Never
pickle: safetensors and JSON only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import floral
from floral.data import ClientData, FederatedTask, TaskConfig
from floral.data.instruct import GenerationData, TextGeneration
from floral.data.text import load_tokenizer
from floral.engines.flower.node_data import NodeData
from floral.train.state import aligned

__all__ = ["FORMAT", "MAX_ENTRIES", "cached_task", "task_key"]

FORMAT = 1  # of the files: a new layout changes every key
MAX_ENTRIES = 4  # a node runs one experiment at a time; a few more for alternating ones
_TENSORS = ("x_train", "y_train", "x_test", "y_test")


def _files(root: Path) -> list[list[Any]]:
    """Every file under `root` (a folder, or one file): relative name, size, mtime."""
    if not root.exists():
        return []
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    found = []
    for path in paths:
        stat = path.stat()
        found.append([str(path.relative_to(root)) if path != root else path.name,
                      stat.st_size, stat.st_mtime_ns])
    return found


def _code() -> list[list[Any]]:
    """floral's task-building code, by file: an edited builder must not serve old tensors."""
    package = Path(floral.__file__).parent
    paths = [*sorted((package / "data").glob("*.py")), package / "engines/flower/node_data.py"]
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def task_key(cfg: TaskConfig, seed: int, node: NodeData | None) -> str:
    """Everything the built task depends on, hashed: the entry's name."""
    data = Path(node.path if node is not None else cfg.data_dir or "").expanduser()
    what = {
        "format": FORMAT,
        "floral": floral.__version__,
        "code": _code(),
        "task": dataclasses.asdict(cfg),
        "seed": seed,
        "node": None if node is None else dataclasses.asdict(node),
        "files": _files(data.absolute()) if str(data) not in ("", ".") else [],
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def cached_task(
    folder: Path, cfg: TaskConfig, seed: int, node: NodeData | None,
    build: Callable[[], FederatedTask],
) -> FederatedTask:
    """The task `build()` gives for `cfg`, `seed` and the node's own data (None: the
    experiment's), from `folder` when an entry of the same key is there (else built, and
    written there for the next process)."""
    key = task_key(cfg, seed, node)
    task = _load(folder, key, cfg)
    if task is None:
        task = build()
        _save(folder, key, task)
    return task


def _load(folder: Path, key: str, cfg: TaskConfig) -> FederatedTask | None:
    try:
        meta = json.loads((folder / f"{key}.json").read_text())
        if meta.get("key") != key:
            return None
        tensors = aligned(load_file(str(folder / f"{key}.safetensors")))
        if sorted(tensors) != sorted(meta["tensors"]):
            return None
        clients = []
        for i, c in enumerate(meta["clients"]):
            x, y, xt, yt = (tensors[f"client/{i}/{name}"] for name in _TENSORS)
            held_out = None if c["generation"] is None else GenerationData(**c["generation"])
            clients.append(ClientData(c["client_id"], c["cluster"], x, y, xt, yt, held_out))
        generation = None
        if meta["generation"] is not None:
            generation = TextGeneration(load_tokenizer(cfg.tokenizer), **meta["generation"])
        os.utime(folder / f"{key}.json")  # recently used: kept by the pruning below
        return FederatedTask(
            meta["name"], meta["kind"], tuple(meta["input_shape"]), meta["num_outputs"],
            meta["num_clusters"], clients,
            {name[len("extras/"):]: t for name, t in tensors.items() if name.startswith("extras/")},
            generation,
        )
    except FileNotFoundError:
        return None
    except (SafetensorError, OSError, ValueError, KeyError, TypeError):
        return None  # damaged or from another layout: built again, and overwritten


def _save(folder: Path, key: str, task: FederatedTask) -> None:
    tensors: dict[str, torch.Tensor] = {
        f"client/{i}/{name}": getattr(c, name) for i, c in enumerate(task.clients)
        for name in _TENSORS
    }
    tensors.update({f"extras/{name}": t for name, t in task.extras.items()})
    meta = {
        "key": key,
        "name": task.name,
        "kind": task.kind,
        "input_shape": list(task.input_shape),
        "num_outputs": task.num_outputs,
        "num_clusters": task.num_clusters,
        "clients": [
            {"client_id": c.client_id, "cluster": c.cluster,
             "generation": None if c.generation is None else dataclasses.asdict(c.generation)}
            for c in task.clients
        ],
        "generation": None if task.generation is None else {
            f.name: getattr(task.generation, f.name)
            for f in dataclasses.fields(task.generation) if f.name != "tokenizer"
        },
        "tensors": sorted(tensors),
    }
    folder.mkdir(parents=True, exist_ok=True)
    aside = f".{os.getpid()}.tmp"
    try:
        # Tensors first, their description last: the JSON makes the entry.
        # Cloned: safetensors refuses tensors that share memory (the empty entries of other
        # nodes' clients are slices of this node's).
        save_file({n: t.detach().cpu().contiguous().clone() for n, t in tensors.items()},
                  str(folder / f"{key}.safetensors{aside}"), metadata={"key": key})
        os.replace(folder / f"{key}.safetensors{aside}", folder / f"{key}.safetensors")
        (folder / f"{key}.json{aside}").write_text(json.dumps(meta))
        os.replace(folder / f"{key}.json{aside}", folder / f"{key}.json")
    except OSError:
        return  # a full or read-only disk: the node runs on, building every message
    _prune(folder, key)


def _prune(folder: Path, current: str) -> None:
    entries = sorted(
        ((p.stat().st_mtime_ns, p.stem) for p in folder.glob("*.json") if p.stem != current),
        reverse=True,
    )
    for _, stem in entries[MAX_ENTRIES - 1:]:
        (folder / f"{stem}.json").unlink(missing_ok=True)
        (folder / f"{stem}.safetensors").unlink(missing_ok=True)
