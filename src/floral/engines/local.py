"""The in-process engine: the round driver over a transport that runs clients in this process.

Clients run one after another on one shared scratch model (or, with `[engine] batch_clients`,
many at once: floral.engines.batched), on the placement's device. Each client's private state
lives in a per-client store, on the CPU, as does everything the driver sees. Randomness comes
only from (seed, round, client), so a run resumed from a checkpoint ends with exactly the
numbers of an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from floral.comm import CommConfig, build_codec
from floral.data import FederatedTask
from floral.engines.batched import batched_client_steps
from floral.engines.config import EngineConfig
from floral.engines.driver import (
    Driver,
    Evaluated,
    Trained,
    check_state_names,
    client_seed,
    router_summary,
)
from floral.methods.base import ClientJob, ClientUpdate, Method, ServerState, split_roles
from floral.train.device import Placement, default_threads, threads, to_device
from floral.train.loop import TrainConfig
from floral.train.objective import get_objective
from floral.train.state import StateSlots, TensorDict, is_optimizer_key

__all__ = ["LocalEngine", "LocalTransport"]


class LocalTransport:
    """Client steps in this process, on one scratch model; private states kept per client."""

    def __init__(
        self,
        method: Method,
        task: FederatedTask,
        model: nn.Module,
        train: TrainConfig,
        config: EngineConfig,
        seed: int,
        comm: CommConfig,
        placement: Placement | None = None,
    ) -> None:
        self.method, self.task, self.train_config, self.config, self.seed = (
            method, task, train, config, seed
        )
        self.placement = placement or Placement()
        self.objective = get_objective(task.kind)
        self.down = build_codec(comm.download, "comm.download")
        self.up = build_codec(comm.upload, "comm.upload")
        self.slots = StateSlots(model.to(self.placement.device))
        self.threads = config.threads or default_threads(model, train.batch_size)
        global_names, private_names = split_roles(method.roles(model))
        global_state = self.slots.snapshot(global_names)
        self.initial = ServerState(global_state, method.init_server_state(model, global_state))
        self.initial_private: TensorDict = self.slots.snapshot(private_names)
        self.private: dict[int, TensorDict] = {}
        self.clusters: Mapping[int, int] = {
            k: client.cluster for k, client in enumerate(task.clients)
        }

    def train(
        self, round_: int, clients: Sequence[int], payload: TensorDict
    ) -> dict[int, Trained | str]:
        # Identical on every client: decoded and moved to the device once.
        received = to_device(self.down.decode(payload), self.placement.device)
        jobs = {k: self.job(k, received, round_) for k in clients}
        replies: dict[int, Trained | str] = {}
        with threads(self.threads):
            batched = self.batched_steps(jobs)
            for k, job in jobs.items():
                update = (batched.get(k) or self.method.client_step(self.slots, job)).on_cpu()
                self.private[k] = update.private
                loss = update.metrics.get("train_loss", float("nan"))
                replies[k] = Trained(self.up.encode(update.upload), loss)
        return replies

    def job(self, k: int, global_state: Mapping[str, torch.Tensor], round_: int) -> ClientJob:
        """Client k's step in round `round_`, its tensors on the device."""
        private = to_device(self.private_state(k), self.placement.device)
        return ClientJob(
            global_state, private, self.task.clients[k], self.train_config, self.objective,
            client_seed(self.seed, round_, k), round_, self.placement,
        )

    def batched_steps(self, jobs: Mapping[int, ClientJob]) -> dict[int, ClientUpdate]:
        """Updates of the clients that `engine.batch_clients` trains together (none when off);
        the round runs the rest one by one."""
        if self.config.batch_clients == 0:
            return {}
        batch = list(jobs.values())
        return batched_client_steps(self.method, self.slots, batch, self.config.batch_clients)

    def evaluate(
        self, round_: int, clients: Sequence[int], global_state: TensorDict | None
    ) -> dict[int, Evaluated | str]:
        replies: dict[int, Evaluated | str] = {}
        with threads(self.threads):
            for k in clients:
                private = self.private_state(k)
                result = None
                if global_state is not None:
                    model = self.client_model(k, global_state)
                    data = self.task.clients[k]
                    result = self.objective.evaluate(
                        model, data.x_test, data.y_test, self.train_config.eval_batch_size,
                        self.placement,
                    )
                    generation = self.task.generation
                    if generation is not None and data.generation is not None:
                        result.extra.update(generation.sums(model, data.generation,
                                                            self.placement))
                replies[k] = Evaluated(result, router_summary(self.method, private))
        return replies

    def private_state(self, k: int) -> TensorDict:
        state = self.private.get(k)
        if state is None:
            state = self.method.init_private(self.initial_private, self.task.clients[k])
        return state

    def client_model(self, k: int, global_state: Mapping[str, torch.Tensor]) -> nn.Module:
        """The scratch model loaded with client k's personalized state."""
        self.slots.load(global_state)
        self.slots.load(self.private_state(k))
        return self.slots.model

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
        known = {name for name in found if is_optimizer_key(name)} | set(self.initial_private)
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
    ) -> None:
        config, comm = config or EngineConfig(), comm or CommConfig()
        self.local = LocalTransport(method, task, model, train, config, seed, comm, placement)
        super().__init__(
            method, self.local, self.local.initial, self.local.objective, len(task.clients),
            train, config, comm, seed,
        )

    @property
    def task(self) -> FederatedTask:
        return self.local.task

    @property
    def slots(self) -> StateSlots:
        return self.local.slots

    @property
    def model(self) -> nn.Module:
        return self.local.slots.model

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
