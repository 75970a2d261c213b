"""A tiny experiment file: synthetic MLP task, eight clients, six rounds, in a second or two."""

from __future__ import annotations

__all__ = ["TINY", "TINY_FEDAVG"]

TINY = """
name = "tiny"
seed = 3
[task]
dataset = "synthetic-mlp"
shift = "none"
num_clients = 8
num_clusters = 2
samples_per_client = 40
[model]
name = "mlp"
hidden = [8]
[method]
name = "floral"
[train]
rounds = 6
clients_per_round = 0.5
batch_size = 8
lr = 0.05
[engine]
eval_every = 2
"""

# The same with FedAvg and a checkpoint every 2 rounds.
TINY_FEDAVG = TINY.replace('name = "floral"', 'name = "fedavg"').replace(
    "eval_every = 2", "eval_every = 2\ncheckpoint_every = 2"
)
