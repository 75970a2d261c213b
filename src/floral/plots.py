"""Figures of finished runs that a reader looks at rather than reads.

- `router_weights_of_run`: every client's learned pi from a run's final state, through the
  method's own `router_weights` hook (the plot knows no method).
- `plot_router_heatmap`: those weights as a heatmap, clients sorted by their true cluster, one
  panel per method: a router that found the clusters shows one bright block per cluster.
- `plot_cluster_bars`: the final lead metric (accuracy, MSE, or chrF for a task whose clients
  generate text) of every cluster, per method (mean over seeds, error bar = std), which shows
  whether a method serves every cluster or sacrifices one.

Curves against rounds are `floral.report.plot_curves`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from floral.checkpoint import load_tensors, read_toml
from floral.data.partition import cluster_of
from floral.experiment import RunSummary, resolve_config
from floral.report import pyplot, save_figure
from floral.train.headline import axis_label
from floral.train.recovery import adjusted_rand_index

__all__ = ["RouterMap", "plot_cluster_bars", "plot_router_heatmap", "router_weights_of_run"]


@dataclass
class RouterMap:
    """Learned router weights of one run, clients in id order."""

    weights: np.ndarray  # (clients, C); clients never trained keep the uniform start
    clusters: np.ndarray  # (clients,) true cluster of each client

    @property
    def ari(self) -> float:
        return adjusted_rand_index(self.clusters, self.weights.argmax(axis=1))


def router_weights_of_run(run_dir: Path) -> RouterMap | None:
    """The learned pi of every client in `run_dir`'s final state; None without a learned router,
    or for a run kept without its state (records such as docs/results hold no weights)."""
    if not (run_dir / "state.safetensors").exists():
        return None
    config = resolve_config(read_toml(run_dir / "config.toml"))
    method = config.build_method()
    private: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_tensors(run_dir / "state.safetensors").items():
        if key.startswith("private/"):
            _, client, name = key.split("/", 2)
            private.setdefault(int(client), {})[name] = value
    weights_of = {k: method.router_weights(state) for k, state in private.items()}
    found = {k: pi for k, pi in weights_of.items() if pi is not None}
    if not found:
        return None
    num_adaptors = next(iter(found.values())).shape[-1]
    num_clients = config.task.num_clients
    weights = torch.full((num_clients, num_adaptors), 1.0 / num_adaptors)
    ids = torch.tensor(list(found))
    weights[ids] = torch.stack(list(found.values())).float()
    # Clients are dealt to clusters round-robin (floral.data.partition), so k -> k mod C.
    clusters = np.array([cluster_of(k, config.task.num_clusters) for k in range(num_clients)])
    return RouterMap(weights.numpy(), clusters)


def plot_router_heatmap(maps: Mapping[str, RouterMap], path: Path, title: str) -> Path | None:
    """One panel per method: adaptors (rows) x clients (columns, grouped by true cluster)."""
    plt = pyplot()
    if plt is None or not maps:
        return None
    fig, axes = plt.subplots(
        len(maps), 1, figsize=(8, 0.6 + 1.3 * len(maps)), squeeze=False, sharex=True
    )
    image = None
    for ax, (label, router) in zip(axes[:, 0], maps.items()):
        order = np.argsort(router.clusters, kind="stable")
        image = ax.imshow(
            router.weights[order].T,
            aspect="auto",
            vmin=0.0,
            vmax=1.0,
            cmap="viridis",
            interpolation="nearest",
        )
        _mark_clusters(ax, router.clusters[order])
        ax.set_ylabel("adaptor")
        ax.set_yticks(range(router.weights.shape[1]))
        ax.set_title(f"{label} · ARI {router.ari:.2f}", fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("clients, sorted by true cluster (white lines: cluster boundaries)")
    fig.suptitle(title, fontsize=10)
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="π", fraction=0.03, pad=0.01)
    fig.set_layout_engine("constrained")
    # A constrained layout places the colorbar itself; tight_layout would fight it.
    return save_figure(fig, path, tight=False)


def _mark_clusters(ax: Any, sorted_clusters: np.ndarray) -> None:
    bounds = np.flatnonzero(np.diff(sorted_clusters)) + 0.5
    for x in bounds:
        ax.axvline(x, color="white", linewidth=0.8)
    starts = np.concatenate([[-0.5], bounds])
    ends = np.concatenate([bounds, [len(sorted_clusters) - 0.5]])
    ax.set_xticks((starts + ends) / 2, [f"c{c}" for c in np.unique(sorted_clusters)])


def plot_cluster_bars(
    runs: Mapping[str, Sequence[RunSummary]], path: Path, title: str
) -> Path | None:
    """Final metric per true cluster, one bar per method: mean over seeds, std as error bar."""
    plt = pyplot()
    if plt is None or not runs:
        return None
    metric = next(iter(runs.values()))[0].headline[0]  # chrF for a generation task
    clusters = sorted(
        int(k.rpartition("cluster")[2])
        for k in next(iter(runs.values()))[0].final
        if k.startswith(f"{metric}_cluster")
    )
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.2 * len(clusters) + 4), 4.0))
    for i, (label, summaries) in enumerate(runs.items()):
        values = np.array([[s.final[f"{metric}_cluster{c}"] for c in clusters] for s in summaries])
        x = np.arange(len(clusters)) + (i - (len(runs) - 1) / 2) * width
        ax.bar(x, values.mean(axis=0), width, yerr=values.std(axis=0), label=label, capsize=2)
    ax.set_xticks(range(len(clusters)), [f"cluster {c}" for c in clusters])
    ax.set_ylabel(f"{axis_label(metric)}, final")
    if metric == "mse":
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside, not on, bars
    return save_figure(fig, path)
