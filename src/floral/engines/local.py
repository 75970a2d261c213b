"""The in-process engine: the round driver over a transport that runs clients in this process.

The transport wraps a `ClientWorker` (floral.engines.worker), which runs the clients one after
another on one shared scratch model (or, with `[engine] batch_clients`, many at once), on the
placement's device. Each client's private state lives in a per-client dict, on the CPU, as
does everything the driver sees. Randomness comes
only from (seed, round, client), so a run resumed from a checkpoint ends with exactly the
numbers of an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from floral.comm import CommConfig, build_codec
from floral.data import FederatedTask
from floral.engines.attack import AttackConfig
from floral.engines.config import EngineConfig
from floral.engines.driver import Driver, Evaluated, Trained, check_state_names
from floral.engines.worker import ClientWorker, WorkerSettings
from floral.methods.base import ClientJob, Method
from floral.train.device import Placement
from floral.train.loop import TrainConfig
from floral.train.state import StateSlots, TensorDict, is_optimizer_key

__all__ = ["LocalEngine", "LocalTransport"]


class LocalTransport:
    """Client steps in this process, by one `ClientWorker`; private states kept per client."""

    sums_uploads = False  # the driver sees each client's upload

    def __init__(self, worker: ClientWorker, comm: CommConfig) -> None:
        self.worker = worker
        self.down = build_codec(comm.download, "comm.download")
        self.up = build_codec(comm.upload, "comm.upload")
        self.private: dict[int, TensorDict] = {}
        self.left_out: dict[int, str] = {}  # every client is in this process
        self.clusters: Mapping[int, int] = {
            k: client.cluster for k, client in enumerate(worker.task.clients)
        }

    def train(
        self, round_: int, clients: Sequence[int], payload: TensorDict
    ) -> dict[int, Trained | str]:
        private = {k: self.private_state(k) for k in clients}
        updates = self.worker.train(round_, self.down.decode(payload), private)
        replies: dict[int, Trained | str] = {}
        for k, update in updates.items():
            self.private[k] = update.private
            loss = update.metrics.get("train_loss", float("nan"))
            replies[k] = Trained(self.up.encode(update.upload), loss, update.batch)
        return replies

    def evaluate(
        self, round_: int, clients: Sequence[int], global_state: TensorDict | None
    ) -> dict[int, Evaluated | str]:
        return {k: self.worker.evaluate(k, global_state, self.private_state(k)) for k in clients}

    def job(self, k: int, global_state: Mapping[str, torch.Tensor], round_: int) -> ClientJob:
        """Client k's step in round `round_` with its kept private state (for inspection)."""
        return self.worker.job(k, global_state, self.private_state(k), round_)

    def private_state(self, k: int) -> TensorDict:
        state = self.private.get(k)
        return self.worker.fresh_private(k) if state is None else state

    def client_model(self, k: int, global_state: Mapping[str, torch.Tensor]) -> nn.Module:
        """The scratch model loaded with client k's personalized state."""
        self.worker.slots.load(global_state)
        self.worker.slots.load(self.private_state(k))
        return self.worker.slots.model

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> TensorDict:
        return {
            f"private/{client}/{name}": value
            for client, tensors in self.private.items() for name, value in tensors.items()
        }

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        private: dict[int, TensorDict] = {}
        for key, value in state.items():
            if key.startswith("private/"):
                _, client, name = key.split("/", 2)
                private.setdefault(int(client), {})[name] = value.clone()
        # Extra names only: a client's private state may hold a subset of the model's private
        # tensors (pFedLoRA's own architecture), and clients not yet trained hold none.
        # Kept optimizer state (AdamW's moments) travels with the private tensors.
        found = {name for tensors in private.values() for name in tensors}
        known = {name for name in found if is_optimizer_key(name)} | set(
            self.worker.initial_private)
        check_state_names("private", dict.fromkeys(found), found & known)
        self.private = private


class LocalEngine(Driver):
    """Runs a method over a federated task in this process."""

    def __init__(
        self,
        method: Method,
        task: FederatedTask,
        model: nn.Module,
        train: TrainConfig,
        config: EngineConfig | None = None,
        seed: int = 0,
        comm: CommConfig | None = None,
        placement: Placement | None = None,
        attack: AttackConfig | None = None,
    ) -> None:
        config, comm = config or EngineConfig(), comm or CommConfig()
        settings = WorkerSettings(placement or Placement(), config.threads, config.batch_clients,
                                  attack or AttackConfig())
        self.worker = ClientWorker(method, task, model, train, seed, settings)
        self.local = LocalTransport(self.worker, comm)
        super().__init__(
            method, self.local, self.worker.initial, self.worker.objective, len(task.clients),
            train, config, comm, seed,
        )

    @property
    def task(self) -> FederatedTask:
        return self.worker.task

    @property
    def slots(self) -> StateSlots:
        return self.worker.slots

    @property
    def model(self) -> nn.Module:
        return self.worker.slots.model

    @property
    def private(self) -> dict[int, TensorDict]:
        return self.local.private

    def private_state(self, k: int) -> TensorDict:
        return self.local.private_state(k)

    def client_model(self, k: int) -> nn.Module:
        """The scratch model loaded with client k's personalized state."""
        return self.local.client_model(k, self.global_state)

    def router_weights(self) -> dict[int, torch.Tensor]:
        weights = {k: self.method.router_weights(p) for k, p in sorted(self.private.items())}
        return {k: pi for k, pi in weights.items() if pi is not None}
