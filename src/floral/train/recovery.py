"""Cluster recovery: how well learned routers group clients by their true cluster.

The score is the adjusted Rand index (Hubert and Arabie, 1985) between each client's argmax
router weight and its true cluster: 1 when the two partitions agree up to a relabelling of the
adaptors, about 0 for a partition unrelated to the truth (every client on one adaptor, or
random assignments), negative when worse than chance.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["adjusted_rand_index", "router_recovery"]


def _pairs(counts: np.ndarray) -> float:
    """Number of unordered pairs within each count, summed: sum n (n - 1) / 2."""
    counts = counts.astype(np.float64)
    return float((counts * (counts - 1) / 2).sum())


Labels = np.ndarray | torch.Tensor


def adjusted_rand_index(truth: Labels, predicted: Labels) -> float:
    """ARI of two labelings of the same items, from their contingency table.

    ARI = (index - expected) / (max - expected), with index = sum_ij C(n_ij, 2), the row and
    column sums a_i, b_j, expected = sum_i C(a_i, 2) sum_j C(b_j, 2) / C(n, 2) and
    max = (sum_i C(a_i, 2) + sum_j C(b_j, 2)) / 2. When max == expected both labelings are
    the same trivial partition (one group, or all singletons) and the score is 1.
    """
    truth = np.asarray(truth).ravel()
    predicted = np.asarray(predicted).ravel()
    if truth.shape != predicted.shape:
        raise ValueError(f"labelings of {truth.size} and {predicted.size} items")
    _, rows = np.unique(truth, return_inverse=True)
    _, cols = np.unique(predicted, return_inverse=True)
    num_cols = int(cols.max()) + 1 if cols.size else 1
    num_rows = int(rows.max()) + 1 if rows.size else 1
    table = np.bincount(rows * num_cols + cols, minlength=num_rows * num_cols)
    table = table.reshape(num_rows, num_cols)
    index = _pairs(table)
    sum_rows, sum_cols = _pairs(table.sum(axis=1)), _pairs(table.sum(axis=0))
    total = _pairs(np.array([truth.size]))
    expected = sum_rows * sum_cols / total if total else 0.0
    maximum = (sum_rows + sum_cols) / 2
    if maximum == expected:
        return 1.0
    return float((index - expected) / (maximum - expected))


def router_recovery(weights: torch.Tensor, clusters: torch.Tensor) -> dict[str, float]:
    """Scores of routers `weights` (clients, C) against true `clusters` (clients,).

    `router_ari`: ARI of argmax pi against the clusters. `router_confidence`: the mean over
    clients of max pi (1/C for a router that never moved, 1 for one-hot routers).
    """
    assignment = weights.argmax(dim=1)
    return {
        "router_ari": adjusted_rand_index(clusters.numpy(), assignment.numpy()),
        "router_confidence": float(weights.max(dim=1).values.mean()),
    }
