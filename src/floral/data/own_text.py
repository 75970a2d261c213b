"""Users' plain text for causal language models (`dataset = "text"`).

`data_dir` is a folder holding either one subfolder per client (all the `*.txt` files under
it, in name order) or one `*.txt` file per client; the client's name is the subfolder's or the
file's (without `.txt`). A client's files are joined by blank lines, tokenized, and cut into
blocks of `block_size + 1` tokens as the Austen novels are (floral.data.text): the input is a
block's first `block_size` tokens, the target its last, and the client's last blocks
(`test_fraction`) are its test set.

A client's cluster: `clusters` maps every client's name to a cluster label, or
`cluster_separator` takes the part of the name before it ("de_news" with "_" -> "de"); with
neither, all clients are one cluster. Labels in sorted order are clusters 0, 1, ...
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from floral.data.text import Tokenizer, client_blocks, read_utf8, trim_train
from floral.errors import ConfigError, DatasetNotFoundError

__all__ = ["OWN_TEXT_DATASETS", "TextClient", "build_text_clients", "read_text_clients"]

OWN_TEXT_DATASETS: tuple[str, ...] = ("text",)


@dataclass
class TextClient:
    name: str
    where: str  # its folder or file, for messages
    texts: list[str]


@dataclass
class TextBlocks:
    """One client's blocks; floral.data.task wraps them in a ClientData."""

    cluster: int
    train: torch.Tensor  # (n, block_size + 1)
    test: torch.Tensor


def read_text_clients(path: str) -> list[TextClient]:
    """The clients of a folder of subfolders (one per client) or of `*.txt` files (one per
    client), in name order; every problem is a one-line error naming the file or folder."""
    if not path:
        raise ConfigError(
            'task.data_dir: dataset "text" needs a folder with one subfolder '
            "or one .txt file per client"
        )
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(f"task.data_dir: {root}: no such folder")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = sorted(root.glob("*.txt"))
    if folders and files:
        raise ConfigError(
            f"task.data_dir: {root} holds both subfolders ({folders[0].name}, ...) "
            f"and .txt files ({files[0].name}, ...); clients are one or the other"
        )
    if folders:
        clients = []
        for folder in folders:
            found = sorted(p for p in folder.rglob("*.txt") if p.is_file())
            if not found:
                raise ConfigError(f"{folder}: no .txt file (client {folder.name!r} is empty)")
            clients.append(TextClient(folder.name, str(folder), [_read(f) for f in found]))
        return clients
    if not files:
        raise ConfigError(f"task.data_dir: {root} holds no subfolder and no .txt file")
    return [TextClient(f.stem, str(f), [_read(f)]) for f in files]


def _read(file: Path) -> str:
    text = read_utf8(file)
    if not text.strip():
        raise ConfigError(f"{file}: empty (no text)")
    return text.strip()


def cluster_labels(
    names: list[str], clusters: Mapping[str, str], separator: str, where: str
) -> list[str]:
    """Each client's cluster label, from the `clusters` table or the naming rule."""
    if clusters and separator:
        raise ConfigError("task.clusters: set it or task.cluster_separator, not both")
    if clusters:
        unknown = sorted(set(clusters) - set(names))
        if unknown:
            raise ConfigError(f"task.clusters.{unknown[0]}: no client of that name in {where}")
        missing = [n for n in names if n not in clusters]
        if missing:
            raise ConfigError(
                f"task.clusters: client {missing[0]!r} of {where} has no cluster; name every client"
            )
        for name, label in clusters.items():
            if not isinstance(label, str | int) or isinstance(label, bool):
                raise ConfigError(f"task.clusters.{name}: expected a string, got {label!r}")
        return [str(clusters[n]) for n in names]
    if separator:
        for name in names:
            if separator not in name:
                raise ConfigError(
                    f"task.cluster_separator: client {name!r} of {where} has no "
                    f"{separator!r} in its name, so no cluster"
                )
        return [n.partition(separator)[0] for n in names]
    return [""] * len(names)


def build_text_clients(cfg: Any, tokenizer: Tokenizer) -> list[TextBlocks]:
    """Every client's train and test blocks; `cfg` is a TaskConfig."""
    found = read_text_clients(cfg.data_dir)
    where = str(Path(cfg.data_dir).expanduser())
    if len(found) != cfg.num_clients:
        raise ConfigError(
            f"task.num_clients: {where} holds {len(found)} clients; set "
            f"task.num_clients = {len(found)}"
        )
    labels = cluster_labels([c.name for c in found], cfg.clusters, cfg.cluster_separator, where)
    values = sorted(set(labels))
    if len(values) != cfg.num_clusters:
        how = (
            "task.clusters or task.cluster_separator unset: one cluster"
            if values == [""]
            else f"{', '.join(values)}"
        )
        raise ConfigError(
            f"task.num_clusters: the clients of {where} form {len(values)} "
            f"cluster(s) ({how}); set task.num_clusters = {len(values)}"
        )
    out = []
    for client, label in zip(found, labels, strict=True):
        train, test = client_blocks(
            client.texts, tokenizer, cfg.block_size, cfg.samples_per_client, cfg.test_fraction
        )
        if len(test) == 0:
            raise ConfigError(
                f"{client.where}: client {client.name!r} makes fewer than 2 blocks of "
                f"{cfg.block_size} tokens (one to train, one to test); add text or lower "
                "task.block_size"
            )
        train = trim_train(train, cfg.data_fraction, cfg.min_samples)
        out.append(TextBlocks(values.index(label), train, test))
    return out
