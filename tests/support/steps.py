"""One client step or one server update by hand, as an engine would run them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from floral.data import ClientData
from floral.experiment import build_engine, resolve_config
from floral.methods.base import ClientJob, ClientUpdate, Method, ServerState
from floral.train.loop import TrainConfig
from floral.train.objective import get_objective
from floral.train.optim import ServerOptimizer
from floral.train.state import StateSlots, TensorDict

Tensors = Mapping[str, torch.Tensor]


def client_step(
    method: Method,
    slots: StateSlots,
    global_state: Tensors,
    private_state: Tensors,
    data: ClientData,
    config: TrainConfig,
    kind: str = "classification",
    seed: int = 0,
    round_: int = 1,
) -> ClientUpdate:
    job = ClientJob(global_state, private_state, data, config, get_objective(kind), seed, round_)
    return method.client_step(slots, job)


def server_update(
    method: Method,
    global_state: Tensors,
    uploads: Sequence[Tensors],
    optimizer: ServerOptimizer,
    model: nn.Module | None = None,
) -> TensorDict:
    """The new global tensors; `model` (as built) gives the method its initial server state."""
    own = {} if model is None else method.init_server_state(model, global_state)
    state = ServerState(dict(global_state), own)
    return method.server_update(state, uploads, optimizer).global_state


# Four synthetic-MLP clients of 20 examples: a real round's uploads in a fraction of a second.
UPLOAD_TASK = {"dataset": "synthetic-mlp", "shift": "none", "num_clients": 4, "num_clusters": 2,
               "samples_per_client": 20}


def upload_engine(method: Mapping) -> tuple:
    """(engine, task) of `method` on UPLOAD_TASK, an MLP of 16 hidden units, one round."""
    return build_engine(resolve_config({
        "task": UPLOAD_TASK, "model": {"name": "mlp", "hidden": [16]}, "method": dict(method),
        "train": {"rounds": 1, "batch_size": 8}}))
