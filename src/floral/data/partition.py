"""Which samples each client holds: IID shares, optionally within a cluster's label set."""

from __future__ import annotations

import math

import numpy as np

from floral.data.shifts import in_label_set

__all__ = ["cluster_of", "clients_of_cluster", "iid_shares", "partition", "keep_fraction"]


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
