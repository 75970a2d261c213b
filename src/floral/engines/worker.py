"""What a client does, wherever it runs: one worker, which every transport wraps.

A transport decides where private states live (a dict in this process; a node's disk or
`context.state` on Flower) and how tensors travel; the worker decides everything about how a
client's work runs: the device and compute precision (`Placement`, which also says whether the
forward is compiled), torch's intra-op threads, which clients train together as one batch,
and local differential privacy, applied to each upload before it leaves the worker. The same
worker on both transports is what makes their numbers the same.

What goes in and comes out is on the CPU: the global tensors as decoded, private states,
uploads and evaluation sums.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from floral.data import FederatedTask
from floral.engines.aggregation import private_upload
from floral.engines.attack import Attack, AttackConfig
from floral.engines.batched import batched_client_steps
from floral.engines.config import BatchClients
from floral.engines.driver import Evaluated, client_seed, router_summary
from floral.methods.base import ClientJob, ClientUpdate, Method, ServerState, split_roles
from floral.train.device import Placement, default_threads, threads, to_device
from floral.train.loop import TrainConfig
from floral.train.objective import get_objective
from floral.train.privacy import secret_generator
from floral.train.state import StateSlots, TensorDict

__all__ = ["ClientWorker", "WorkerSettings"]


@dataclass(frozen=True)
class WorkerSettings:
    """How the worker runs clients: where, on how many threads, how many at once."""

    placement: Placement = Placement()
    threads: int = 0  # torch's intra-op threads while clients work; 0: by the model's size
    # Clients of equal data size trained together: "auto" (all, where the tensor step covers
    # the model), at most N, or 0: one by one (`engine.batch_clients`).
    batch_clients: BatchClients = "auto"
    attack: AttackConfig = field(default_factory=AttackConfig)  # experiments: bad clients


class ClientWorker:
    """Trains and evaluates a task's clients with one scratch model, for any transport."""

    def __init__(
        self,
        method: Method,
        task: FederatedTask,
        model: nn.Module,
        train: TrainConfig,
        seed: int,
        settings: WorkerSettings | None = None,
    ) -> None:
        settings = settings or WorkerSettings()
        self.attack = Attack(settings.attack, len(task.clients), seed)
        task = self.attack.poison(task)
        self.method, self.task, self.train_config, self.seed = method, task, train, seed
        self.placement, self.batch_clients = settings.placement, settings.batch_clients
        self.objective = get_objective(task.kind)
        self.slots = StateSlots(model.to(self.placement.device))
        self.threads = settings.threads or default_threads(model, train.batch_size)
        global_names, private_names = split_roles(method.roles(model))
        global_state = self.slots.snapshot(global_names)
        # What the server starts from: every worker of one experiment builds the same.
        self.initial = ServerState(global_state, method.init_server_state(model, global_state))
        self.initial_private: TensorDict = self.slots.snapshot(private_names)

    def fresh_private(self, k: int) -> TensorDict:
        """Client k's private state before its first round."""
        return self.method.init_private(self.initial_private, self.task.clients[k])

    def train(
        self, round_: int, global_state: Mapping[str, torch.Tensor],
        private: Mapping[int, TensorDict],
    ) -> dict[int, ClientUpdate]:
        """One round's steps of the clients in `private` (id -> private state), all from the
        same global tensors; updates on the CPU, uploads as they may leave the client."""
        device = self.placement.device
        received = to_device(global_state, device)  # identical for every client: moved once
        jobs = {k: self.job(k, received, to_device(p, device), round_)
                for k, p in private.items()}
        updates: dict[int, ClientUpdate] = {}
        with threads(self.threads):
            batched = (batched_client_steps(self.method, self.slots, list(jobs.values()),
                                            self.batch_clients)
                       if self.batch_clients else {})
            for k, job in jobs.items():
                update = batched.get(k) or self.method.client_step(self.slots, job)
                update = self.attack.corrupt(k, round_, update.on_cpu())
                updates[k] = self._released(update)
        return updates

    def evaluate(
        self, k: int, global_state: Mapping[str, torch.Tensor] | None, private: TensorDict
    ) -> Evaluated:
        """Client k's test sums with `global_state` (None: only its router's summary)."""
        result = None
        if global_state is not None:
            with threads(self.threads):
                self.slots.load(global_state)
                self.slots.load(private)
                model, data = self.slots.model, self.task.clients[k]
                result = self.objective.evaluate(model, data.x_test, data.y_test,
                                                 self.train_config.eval_batch_size,
                                                 self.placement)
                generation = self.task.generation
                if generation is not None and data.generation is not None:
                    # Statistics that add up across clients: chrF and exact match come from
                    # the totals, never from one client's.
                    result.extra.update(generation.sums(model, data.generation, self.placement))
        return Evaluated(result, router_summary(self.method, private))

    def job(
        self, k: int, global_state: Mapping[str, torch.Tensor], private: TensorDict, round_: int
    ) -> ClientJob:
        """Client k's step in round `round_` from these tensors, as they are (no move)."""
        return ClientJob(
            global_state, private, self.task.clients[k], self.train_config, self.objective,
            client_seed(self.seed, round_, k), round_, self.placement,
        )

    def _released(self, update: ClientUpdate) -> ClientUpdate:
        """The update as it may leave the client: under local differential privacy, clipped
        and noised here, with noise from OS entropy that no one else can replay."""
        config = self.train_config
        if not (config.dp_clip > 0 and config.dp_mode == "local"):
            return update
        noised = private_upload([update.upload], config.dp_clip, config.dp_noise,
                                secret_generator())
        return replace(update, upload=noised)
