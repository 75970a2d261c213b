"""A SuperNode's own data: its client's files, in a folder its node config names.

    flower-supernode ... --node-config 'partition-id=3 data-path="/srv/site3/data"'

In this mode a node reads nothing but its folder: the task's shape (input size, classes,
tokenizer and lengths) comes from the experiment the server sends, and the node checks its
files against it. The folder holds one client's data in a format floral reads:

- `task.dataset = "jsonl"`: one `*.jsonl` file (prompt/response or messages lines,
  floral.data.instruct), split into train and held-out examples with the experiment's seed and
  the node's client index, as the local engine splits client k of a folder of such files;
- `task.dataset = "mnist"`, `"fashion-mnist"`: the four IDX files
  (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`,
  `t10k-labels-idx1-ubyte`, optionally gzipped) of 28x28 images with labels 0-9;
  `"cifar10"`, `"cifar100"`: the CIFAR binary files (`data_batch_*.bin`, `test_batch.bin`;
  `train.bin`, `test.bin`); `"mnist5k"`: `mnist_5k.csv[.gz]`. The experiment's
  normalization applies, and a `rotate` or `label-shift` shift by the node's cluster.

The node's cluster (used for per-cluster metrics and oracle routers, never for training) is its
node config's `cluster`, else the convention of floral's tasks, client k in cluster k mod C.
Other clients of the federation appear in the node's task as empty entries, so the model and
the methods (ranks per client) are built exactly as on every other node.

Every problem with a node's data (its folder missing, a file missing, empty, truncated or
malformed, data that does not fit the task) is one line, worded here for a site:
`node data (partition-id=K) FILE: PROBLEM`, FILE being the folder for what it lacks. The
loaders' own messages, which may send a user to a package's or a download's copy of a data
set, are for a user's own machine, not for a site.

`data_digest` is the digest a node reports of its data with its first reply: of the files it
reads, each as uncompressed (`files_digest`), so the same data gives the same digest on any
node, whatever its partition-id, cluster or shift; the server warns when two nodes report the
same one (floral.engines.flower.server).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import zlib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from floral.data import ClientData, FederatedTask, TaskConfig
from floral.data.instruct import build_jsonl
from floral.data.partition import cluster_of
from floral.data.sources import SPLIT_SOURCES, DataFileError, load_source, source_files
from floral.data.task import cluster_images, validate_task
from floral.data.text import load_tokenizer
from floral.errors import ConfigError

__all__ = [
    "NODE_DATASETS",
    "NodeData",
    "data_digest",
    "files_digest",
    "node_data",
    "node_files",
    "node_task",
]

# The shape every node's images must have: the task's, known without data.
_IMAGE_SHAPES = {
    "mnist": (1, 28, 28),
    "fashion-mnist": (1, 28, 28),
    "mnist5k": (1, 28, 28),
    "cifar10": (3, 32, 32),
    "cifar100": (3, 32, 32),
}
NODE_DATASETS: tuple[str, ...] = ("jsonl", *_IMAGE_SHAPES)
_NODE_SHIFTS = ("none", "rotate", "label-shift")


@dataclass(frozen=True)
class NodeData:
    """Where a node's own client's data is, and which client it is."""

    path: str
    client: int
    cluster: int | None = None


def node_data(node_config: Mapping[str, Any]) -> NodeData | None:
    """The node's own data from its config (`data-path`, `partition-id`, optional `cluster`);
    None for a node that takes a partition of the experiment's task."""
    path = node_config.get("data-path")
    if path is None:
        return None
    k, cluster = node_config.get("partition-id"), node_config.get("cluster")
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ConfigError(
            "node config: data-path needs partition-id=K, this node's client "
            f"index (0, 1, ...), got {k!r}"
        )
    if cluster is not None and (not isinstance(cluster, int) or cluster < 0):
        raise ConfigError(f"node config: cluster must be an integer 0 or more, got {cluster!r}")
    return NodeData(str(path), k, cluster)


def node_task(cfg: TaskConfig, seed: int, data: NodeData) -> FederatedTask:
    """The federated task as this node sees it: its own client from its folder, the others
    empty. Data that is missing, unreadable or does not fit the experiment's task is a
    one-line error naming the node's client, the file and the problem."""
    if cfg.dataset not in NODE_DATASETS:
        raise ConfigError(
            f"node config: data-path: task.dataset {cfg.dataset!r} is not read "
            f"from a node's folder (choose from {', '.join(NODE_DATASETS)})"
        )
    if not 0 <= data.client < cfg.num_clients:
        raise ConfigError(
            f"node config: partition-id={data.client} but the experiment has "
            f"task.num_clients={cfg.num_clients}"
        )
    cluster = cluster_of(data.client, cfg.num_clusters) if data.cluster is None else data.cluster
    if cluster >= cfg.num_clusters:
        raise ConfigError(
            f"node config: cluster={cluster} but the experiment has "
            f"task.num_clusters={cfg.num_clusters}"
        )
    folder = _folder(data)
    with _worded(data):
        files = node_files(cfg.dataset, folder)
        if cfg.dataset == "jsonl":
            task = _jsonl_task(cfg, seed, files[0], data.client)
        else:
            task = _image_task(cfg, folder, files, cluster)
    own = dataclasses.replace(task.clients[0], client_id=data.client, cluster=cluster)
    task.clients = [
        own if j == data.client else _absent(j, own, cfg.num_clusters)
        for j in range(cfg.num_clients)
    ]
    task.num_clusters = cfg.num_clusters
    return task


def node_files(dataset: str, folder: Path) -> list[Path]:
    """The files of `folder` that a node reads for `task.dataset`; a missing one is an error
    naming what the folder lacks and what it holds."""
    if dataset == "jsonl":
        files = sorted(folder.glob("*.jsonl"))
        if len(files) > 1:
            raise _problem(folder, f"holds {len(files)} *.jsonl files; a node's folder holds "
                                   "its client's one file")
        missing = [] if files else ["a *.jsonl file"]
    else:
        files, missing = source_files(dataset, folder)
    if missing:
        raise _problem(folder, f"missing {', '.join(missing)} ({_contents(folder)})")
    return files


def data_digest(dataset: str, data: NodeData) -> str:
    """The digest of the node's data: `files_digest` of the files it reads for `dataset`."""
    with _worded(data):
        return files_digest(node_files(dataset, _folder(data)))


def files_digest(files: Iterable[Path]) -> str:
    """SHA-256 of the sorted SHA-256 digests (hex, one a line) of the files' contents, a
    gzipped file's uncompressed: the same data gives the same digest on any node, whatever its
    folder, its files' names, or their compression. From a shell, the same digest:
    `for f in FILES; do zcat -f "$f" | sha256sum; done | cut -c1-64 | LC_ALL=C sort | sha256sum`."""
    digests = []
    for path in files:
        digest = hashlib.sha256()
        opener = gzip.open if path.suffix == ".gz" else open
        with _decompressing(path), opener(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        digests.append(digest.hexdigest())
    return hashlib.sha256("".join(f"{d}\n" for d in sorted(digests)).encode()).hexdigest()


@contextmanager
def _decompressing(path: Path) -> Iterator[None]:
    try:
        yield
    except EOFError:
        raise DataFileError(path, "truncated (its compressed data ends early)") from None
    except (gzip.BadGzipFile, zlib.error):
        raise DataFileError(path, "not gzip data, though its name ends in .gz") from None


def _folder(data: NodeData) -> Path:
    folder = Path(data.path).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"node data (partition-id={data.client}) {folder}: no such folder "
            "(node config data-path)"
        )
    return folder


def _contents(folder: Path) -> str:
    """What a folder holds, for a message: its first few names."""
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    if not names:
        return "the folder is empty"
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return f"the folder holds {', '.join(names[:3])}{more}"


@contextmanager
def _worded(data: NodeData) -> Iterator[None]:
    """Every problem with the node's data as one line: `node data (partition-id=K) FILE:
    PROBLEM`, K the node's client. The loaders' own messages (which may send a user to a
    package's copy of a data set) are for a user's machine, not a site's: reworded here."""
    where = f"node data (partition-id={data.client})"
    folder = Path(data.path).expanduser()
    try:
        yield
    except DataFileError as error:
        raise ConfigError(_one_line(f"{where} {error.path}: {error.problem}")) from None
    except ConfigError as error:
        message = str(error)
        if message.startswith(where):
            raise
        if not message.startswith(f"{folder}"):
            message = f"{folder}: {message}"
        raise ConfigError(_one_line(f"{where} {message}")) from None
    except OSError as error:
        path = error.filename or folder
        raise ConfigError(_one_line(f"{where} {path}: cannot be read ({error.strerror or error})")
                          ) from None
    except (EOFError, ValueError, zlib.error) as error:
        raise ConfigError(_one_line(f"{where} {folder}: {type(error).__name__}: {error}")
                          ) from None


def _problem(path: Path, problem: str) -> ConfigError:
    """A problem with one of the node's files (or its folder), for `_worded` to word."""
    return ConfigError(f"{path}: {problem}")


def _one_line(message: str) -> str:
    return " ".join(message.splitlines())


def _absent(k: int, like: ClientData, num_clusters: int) -> ClientData:
    """Another node's client: no examples here."""
    return ClientData(
        k,
        cluster_of(k, num_clusters),
        like.x_train[:0],
        like.y_train[:0],
        like.x_test[:0],
        like.y_test[:0],
    )


def _jsonl_task(cfg: TaskConfig, seed: int, file: Path, client: int) -> FederatedTask:
    # The node's file alone, as a one-client task; the cluster column, if any, is one value.
    own = dataclasses.replace(cfg, data_dir=str(file.parent), num_clients=1, num_clusters=1)
    validate_task(own)
    tokenizer = load_tokenizer(own.tokenizer)
    # Split with the client's own index, as the local engine splits client k of a folder of
    # one file per client: both engines then train and test on the same examples.
    try:
        built = build_jsonl(own, seed, tokenizer, client_ids=[client])
    except ConfigError as error:  # name the file where the loader names its folder or none
        message = str(error)
        if not message.startswith(str(file)):
            raise ConfigError(f"{file}: {message}") from None
        raise
    (c,) = built.clients
    return FederatedTask(
        name=cfg.dataset,
        kind="causal-lm",
        input_shape=(cfg.max_length,),
        num_outputs=tokenizer.vocab_size,
        num_clusters=1,
        clients=[ClientData(0, c.cluster, c.x_train, c.y_train, c.x_test, c.y_test,
                            c.generation)],
        generation=built.generation if cfg.generate_tokens > 0 else None,
    )


def _image_task(cfg: TaskConfig, folder: Path, files: list[Path], cluster: int) -> FederatedTask:
    if cfg.shift not in _NODE_SHIFTS:
        raise ConfigError(
            f"task.shift: {cfg.shift!r} partitions a shared dataset; a node's own "
            f"data takes {', '.join(_NODE_SHIFTS)}"
        )
    source = load_source(cfg.dataset, str(folder), cfg.test_fraction)
    want = _IMAGE_SHAPES[cfg.dataset]
    if source.image_shape != want:
        raise _problem(
            _file_of(files, "train", "images") or folder, f"images of shape "
            f"{source.image_shape}; task.dataset = {cfg.dataset!r} needs {want}"
        )
    tensors: list[Tensor] = []
    for split in ("train", "test"):
        pixels, y = getattr(source, f"x_{split}"), getattr(source, f"y_{split}")
        where = _file_of(files, split, "labels") or folder
        if len(y) == 0:
            rows = len(source.y_train) + len(source.y_test)
            raise _problem(where, f"no {split} examples" + (
                f": task.test_fraction = {cfg.test_fraction:g} holds out none of {rows} rows "
                "(it rounds per class)" if split == "test" and cfg.dataset in SPLIT_SOURCES
                else ""))
        if y.min() < 0 or y.max() >= source.num_classes:
            raise _problem(
                where, f"{split} labels in [{y.min()}, {y.max()}]; "
                f"task.dataset = {cfg.dataset!r} has {source.num_classes} classes "
                f"(0 to {source.num_classes - 1})"
            )
        tensors += cluster_images(pixels.copy(), y.copy(), source, cfg, cluster)
    client = ClientData(0, cluster, tensors[0], tensors[1], tensors[2], tensors[3])
    return FederatedTask(
        cfg.dataset, "classification", want, source.num_classes, cfg.num_clusters, [client]
    )


def _file_of(files: list[Path], split: str, part: str) -> Path | None:
    """The one file that holds a split's images or labels, for messages: IDX files hold one
    part of one split, CIFAR-100's one split, mnist_5k's everything; CIFAR-10's training
    images are in five files (None)."""
    if len(files) == 4:
        return files[("train", "test").index(split) * 2 + ("images", "labels").index(part)]
    if len(files) == 6:
        return files[5] if split == "test" else None
    return files[0] if len(files) == 1 or split == "train" else files[1]
