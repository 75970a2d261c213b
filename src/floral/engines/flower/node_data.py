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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from floral.data import ClientData, FederatedTask, TaskConfig
from floral.data.instruct import build_jsonl
from floral.data.partition import cluster_of
from floral.data.sources import load_source
from floral.data.task import cluster_images, validate_task
from floral.data.text import load_tokenizer
from floral.errors import ConfigError, FloralError

__all__ = ["NODE_DATASETS", "NodeData", "node_data", "node_task"]

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
    empty. Data that does not fit the experiment's task is a one-line error naming the node's
    folder."""
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
    folder = Path(data.path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"node data {folder}: no such folder (node config data-path)")
    try:
        if cfg.dataset == "jsonl":
            task = _jsonl_task(cfg, seed, folder, data.client)
        else:
            task = _image_task(cfg, folder, cluster)
    except FloralError as error:
        message = str(error)
        raise ConfigError(
            message if str(folder) in message else f"node data {folder}: {message}"
        ) from None
    own = dataclasses.replace(task.clients[0], client_id=data.client, cluster=cluster)
    task.clients = [
        own if j == data.client else _absent(j, own, cfg.num_clusters)
        for j in range(cfg.num_clients)
    ]
    task.num_clusters = cfg.num_clusters
    return task


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


def _jsonl_task(cfg: TaskConfig, seed: int, folder: Path, client: int) -> FederatedTask:
    files = sorted(folder.glob("*.jsonl"))
    if len(files) != 1:
        raise ConfigError(
            f"node data {folder}: holds {len(files)} *.jsonl files; a node's "
            "folder holds its client's one file"
        )
    # The node's file alone, as a one-client task; the cluster column, if any, is one value.
    own = dataclasses.replace(cfg, data_dir=str(folder), num_clients=1, num_clusters=1)
    validate_task(own)
    tokenizer = load_tokenizer(own.tokenizer)
    # Split with the client's own index, as the local engine splits client k of a folder of
    # one file per client: both engines then train and test on the same examples.
    built = build_jsonl(own, seed, tokenizer, client_ids=[client])
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


def _image_task(cfg: TaskConfig, folder: Path, cluster: int) -> FederatedTask:
    if cfg.shift not in _NODE_SHIFTS:
        raise ConfigError(
            f"task.shift: {cfg.shift!r} partitions a shared dataset; a node's own "
            f"data takes {', '.join(_NODE_SHIFTS)}"
        )
    source = load_source(cfg.dataset, str(folder), cfg.test_fraction)
    want = _IMAGE_SHAPES[cfg.dataset]
    if source.image_shape != want:
        raise ConfigError(
            f"node data {folder}: images of shape {source.image_shape}; "
            f"task.dataset = {cfg.dataset!r} needs {want}"
        )
    tensors: list[Tensor] = []
    for split in ("train", "test"):
        pixels, labels = getattr(source, f"x_{split}"), getattr(source, f"y_{split}")
        if len(labels) == 0:
            raise ConfigError(f"node data {folder}: no {split} examples")
        if labels.min() < 0 or labels.max() >= source.num_classes:
            raise ConfigError(
                f"node data {folder}: {split} labels in [{labels.min()}, "
                f"{labels.max()}]; task.dataset = {cfg.dataset!r} has "
                f"{source.num_classes} classes (0 to {source.num_classes - 1})"
            )
        tensors += cluster_images(pixels.copy(), labels.copy(), source, cfg, cluster)
    client = ClientData(0, cluster, tensors[0], tensors[1], tensors[2], tensors[3])
    return FederatedTask(
        cfg.dataset, "classification", want, source.num_classes, cfg.num_clusters, [client]
    )
