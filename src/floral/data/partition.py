"""Which samples each client holds: IID shares, optionally within a cluster's label set, or
label-skewed shares (Dirichlet proportions per class, or a fixed number of classes per client)."""

from __future__ import annotations

import math

import numpy as np

from floral.data.shifts import in_label_set

__all__ = [
    "LABEL_SKEWS",
    "cluster_of",
    "clients_of_cluster",
    "iid_shares",
    "partition",
    "keep_fraction",
    "class_sets",
    "dirichlet_proportions",
    "set_proportions",
    "split_by_proportions",
]

# Partitions that skew each client's label distribution; train and test follow the same skew.
LABEL_SKEWS: tuple[str, ...] = ("dirichlet", "classes-per-client")


def cluster_of(client_id: int, num_clusters: int) -> int:
    """The cluster of a client: clients are dealt round-robin, k -> k mod C."""
    return client_id % num_clusters


def clients_of_cluster(cluster: int, num_clients: int, num_clusters: int) -> list[int]:
    return list(range(cluster, num_clients, num_clusters))


def iid_shares(indices: np.ndarray, num_parts: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`indices` shuffled and cut into `num_parts` parts whose sizes differ by at most one."""
    return np.array_split(rng.permutation(indices), num_parts)


def partition(
    labels: np.ndarray,
    num_clients: int,
    num_clusters: int,
    rng: np.random.Generator,
    by_label_set: bool = False,
) -> list[np.ndarray]:
    """Indices into `labels` held by each client.

    Plain: IID shares of all samples. `by_label_set`: cluster c owns the samples whose label is
    c mod C, shared IID among the clients of cluster c.
    """
    if not by_label_set:
        return iid_shares(np.arange(len(labels)), num_clients, rng)
    shares: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * num_clients
    for cluster in range(num_clusters):
        members = clients_of_cluster(cluster, num_clients, num_clusters)
        owned = np.flatnonzero(in_label_set(labels, cluster, num_clusters))
        for client, share in zip(members, iid_shares(owned, len(members), rng), strict=True):
            shares[client] = share
    return shares


def keep_fraction(indices: np.ndarray, fraction: float, min_samples: int) -> np.ndarray:
    """The first round(fraction * n) of an already shuffled share, but at least `min_samples`."""
    total = len(indices)
    kept = max(math.floor(fraction * total + 0.5), min_samples)
    return indices[: min(kept, total)]


def dirichlet_proportions(
    num_classes: int, num_clients: int, alpha: float, rng: np.random.Generator
) -> np.ndarray:
    """(classes, clients): row c is the share of class c's samples each client gets, ~ Dir(alpha).

    Small alpha gives each class to few clients (strong skew); large alpha tends to IID.
    """
    return rng.dirichlet(np.full(num_clients, alpha), size=num_classes)


def class_sets(
    num_classes: int, num_clients: int, per_client: int, rng: np.random.Generator
) -> np.ndarray:
    """(clients, per_client): the distinct classes each client holds, drawn without replacement."""
    draws = [rng.choice(num_classes, per_client, replace=False) for _ in range(num_clients)]
    return np.stack(draws)


def set_proportions(sets: np.ndarray, num_classes: int) -> np.ndarray:
    """(classes, clients) proportions that split each class evenly among the clients holding it.

    A class that no client holds keeps an all-zero row: its samples are left out.
    """
    num_clients = len(sets)
    holds = np.zeros((num_classes, num_clients))
    holds[sets.T, np.arange(num_clients)] = 1.0  # broadcast: every (class, client) pair held
    holders = holds.sum(axis=1, keepdims=True)
    return np.divide(holds, holders, out=np.zeros_like(holds), where=holders > 0)


def split_by_proportions(
    labels: np.ndarray, proportions: np.ndarray, rng: np.random.Generator
) -> list[np.ndarray]:
    """Indices into `labels` per client, in random order: class c's samples are cut by row c of
    `proportions` (rounded down cumulatively, so every sample of a held class is dealt once)."""
    num_classes, num_clients = proportions.shape
    owner = np.full(len(labels), num_clients)  # num_clients = nobody (a class no client holds)
    for c in range(num_classes):  # a loop over classes (10 or 100), not over samples
        members = rng.permutation(np.flatnonzero(labels == c))
        total = proportions[c].sum()
        if total == 0 or len(members) == 0:
            continue
        cuts = np.floor(np.cumsum(proportions[c]) / total * len(members) + 1e-9).astype(np.int64)
        owner[members] = np.repeat(np.arange(num_clients), np.diff(cuts, prepend=0))
    shuffled = rng.permutation(len(labels))
    grouped = shuffled[np.argsort(owner[shuffled], kind="stable")]
    sizes = np.bincount(owner, minlength=num_clients + 1)[:num_clients]
    return np.split(grouped[: sizes.sum()], np.cumsum(sizes)[:-1])
