"""The FLoRAL paper's synthetic regression tasks: a shared map plus a rank-1 shift per cluster.

Parameters: W ~ N(0, 1)/sqrt(d) (d x d), b ~ N(0, 1)/sqrt(d) (d,), and per cluster c
u_c ~ N(0, 1)/sqrt(d) (d x 1), v_c ~ N(0, 1) (1 x d). Client k in cluster c = k mod C uses
W_k = W + 2 u_c v_c, with inputs x ~ N(0, I_d).
- synthetic-linear: y = (x W_k + b)[:, :3]
- synthetic-mlp:    y = ReLU(x W_k + b) W_out, with W_out ~ N(0, 1)/sqrt(d) (d x 1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from floral.data.partition import cluster_of

__all__ = [
    "SYNTHETIC_DATASETS",
    "SyntheticSpec",
    "INPUT_DIM",
    "generate_parameters",
    "client_weight",
    "targets",
    "generate_clients",
]

INPUT_DIM = 10


@dataclass(frozen=True)
class SyntheticSpec:
    num_outputs: int
    samples_per_client: int  # the paper's value, used when the setting is 0


SYNTHETIC_DATASETS: dict[str, SyntheticSpec] = {
    "synthetic-linear": SyntheticSpec(num_outputs=3, samples_per_client=8),
    "synthetic-mlp": SyntheticSpec(num_outputs=1, samples_per_client=120),
}


def generate_parameters(
    name: str, num_clusters: int, generator: torch.Generator
) -> dict[str, Tensor]:
    """W (d, d), b (d,), u (C, d, 1), v (C, 1, d) and, for the MLP task, W_out (d, 1)."""
    d, scale = INPUT_DIM, 1.0 / math.sqrt(INPUT_DIM)
    params = {
        "W": torch.randn(d, d, generator=generator) * scale,
        "b": torch.randn(d, generator=generator) * scale,
        "u": torch.randn(num_clusters, d, 1, generator=generator) * scale,
        "v": torch.randn(num_clusters, 1, d, generator=generator),
    }
    if name == "synthetic-mlp":
        params["W_out"] = torch.randn(d, 1, generator=generator) * scale
    return params


def client_weight(params: dict[str, Tensor], cluster: int) -> Tensor:
    """W_k = W + 2 u_c v_c for a client of cluster c."""
    return params["W"] + 2.0 * params["u"][cluster] @ params["v"][cluster]


def targets(name: str, params: dict[str, Tensor], x: Tensor, cluster: int) -> Tensor:
    hidden = x @ client_weight(params, cluster) + params["b"]
    if name == "synthetic-linear":
        return hidden[:, : SYNTHETIC_DATASETS[name].num_outputs]
    return torch.relu(hidden) @ params["W_out"]


def generate_clients(
    name: str, num_clients: int, num_clusters: int, samples_per_client: int, seed: int
) -> tuple[dict[str, Tensor], list[tuple[Tensor, Tensor]]]:
    """The generating parameters and each client's (x, y), all drawn from `seed` alone."""
    generator = torch.Generator().manual_seed(seed)
    params = generate_parameters(name, num_clusters, generator)
    samples = samples_per_client or SYNTHETIC_DATASETS[name].samples_per_client
    clients = []
    for client_id in range(num_clients):
        x = torch.randn(samples, INPUT_DIM, generator=generator)
        clients.append((x, targets(name, params, x, cluster_of(client_id, num_clusters))))
    return params, clients
