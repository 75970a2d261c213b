"""The in-process engine: clients run one after another on one shared scratch model.

It knows nothing of any particular method: it asks the method for roles, runs its client step
on each sampled client, keeps each client's private state in a per-client store, and hands the
uploads to the method's server update. Randomness comes only from (seed, round, client), so a
run resumed from a checkpoint ends with exactly the numbers of an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from floral.comm import Channel, CommConfig, build_codec
from floral.data import ClientData, FederatedTask
from floral.engines.batched import ClientJob, batched_client_steps
from floral.errors import ConfigError
from floral.methods.base import ClientUpdate, Method, split_roles
from floral.train.evaluate import EvalResult, evaluate
from floral.train.loop import TrainConfig
from floral.train.optim import build_server_optimizer
from floral.train.recovery import router_recovery
from floral.train.state import StateSlots, TensorDict

__all__ = [
    "EngineConfig",
    "LocalEngine",
    "RoundResult",
    "client_seed",
    "metric_name",
    "sample_clients",
]


@dataclass
class EngineConfig:
    """The `[engine]` table."""

    name: str = "local"  # local | flower
    eval_every: int = 10  # evaluate every N rounds (and after the last)
    eval_clients: str = "all"  # all | sampled
    checkpoint_every: int = 0  # 0 = only the final state
    # Train up to N sampled clients of equal data size at once (vmap); 0 = one by one.
    batch_clients: int = 0


@dataclass
class RoundResult:
    round: int
    seconds: float
    bytes_down: int
    bytes_up: int
    clients: list[int]
    train_loss: float
    eval: dict[str, float] = field(default_factory=dict)  # empty on rounds without evaluation


def sample_clients(seed: int, round_: int, num_clients: int, fraction: float) -> list[int]:
    """The clients of one round: a seeded draw without replacement, sorted."""
    count = max(1, round(fraction * num_clients))
    rng = np.random.default_rng([seed, round_, 0x5A])
    return sorted(rng.choice(num_clients, size=count, replace=False).tolist())


def client_seed(seed: int, round_: int, client: int) -> int:
    """A 63-bit seed that depends only on (seed, round, client): splitmix64 over the three."""
    mask = (1 << 64) - 1
    z = seed & mask
    for value in (round_, client):
        z = (z ^ value) + 0x9E3779B97F4A7C15 & mask
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & mask
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & mask
        z ^= z >> 31
    return z >> 1


class LocalEngine:
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
    ) -> None:
        config = config or EngineConfig()
        comm = comm or CommConfig()
        self.down = Channel(build_codec(comm.download, "comm.download"))
        self.up = Channel(build_codec(comm.upload, "comm.upload"))
        if config.eval_clients not in ("all", "sampled"):
            raise ConfigError(
                f"engine.eval_clients: unknown {config.eval_clients!r} (choose from all, sampled)"
            )
        if config.batch_clients < 0:
            raise ConfigError(f"engine.batch_clients: must be >= 0, got {config.batch_clients}")
        if not 0 < train.clients_per_round <= 1:
            raise ConfigError(
                f"train.clients_per_round: must be in (0, 1], got {train.clients_per_round}"
            )
        self.method, self.task, self.train, self.config, self.seed = (
            method, task, train, config, seed
        )
        self.slots = StateSlots(model)
        self.global_names, self.private_names = split_roles(method.roles(model))
        self.global_state: TensorDict = self.slots.snapshot(self.global_names)
        self.initial_private: TensorDict = self.slots.snapshot(self.private_names)
        self.private: dict[int, TensorDict] = {}
        self.server_optimizer = build_server_optimizer(train)
        self.round = 0

    @property
    def model(self) -> nn.Module:
        return self.slots.model

    def run(self, on_round: Callable[[RoundResult], None] | None = None) -> list[RoundResult]:
        """Run rounds until `train.rounds`; returns what each round reported."""
        results = []
        while self.round < self.train.rounds:
            results.append(self.run_round())
            if on_round is not None:
                on_round(results[-1])
        return results

    # -- one round ---------------------------------------------------------------------------
    def run_round(self) -> RoundResult:
        """Train the sampled clients, aggregate, and evaluate when it is time."""
        self.round += 1
        start = time.perf_counter()
        clients = sample_clients(
            self.seed, self.round, len(self.task.clients), self.train.clients_per_round
        )
        uploads, losses, bytes_up = [], [], 0
        # Every sampled client receives the same payload: encode once, count it per client.
        client_view, down = self.down.send(self.global_state)
        batched = self.batched_steps(clients, client_view)
        for k in clients:
            update = batched.get(k) or self.method.client_step(
                self.slots,
                client_view,
                self.private_state(k),
                self.task.clients[k],
                self.train,
                self.task.kind,
                client_seed(self.seed, self.round, k),
            )
            self.private[k] = update.private
            received, sent = self.up.send(update.upload)
            uploads.append(received)
            losses.append(update.metrics.get("train_loss", float("nan")))
            bytes_up += sent
        self.global_state = self.method.server_update(
            self.global_state, uploads, self.server_optimizer
        )
        seconds = time.perf_counter() - start
        result = RoundResult(
            self.round, seconds, down * len(clients), bytes_up, clients, float(np.mean(losses))
        )
        if self.is_eval_round(self.round):
            targets = clients if self.config.eval_clients == "sampled" else None
            result.eval = self.evaluate(targets)
        return result

    def batched_steps(
        self, clients: Sequence[int], global_state: Mapping[str, torch.Tensor]
    ) -> dict[int, ClientUpdate]:
        """Updates of the clients that `engine.batch_clients` trains together (none when off);
        the round runs the rest one by one."""
        if self.config.batch_clients == 0:
            return {}
        jobs = [
            ClientJob(k, self.task.clients[k], self.private_state(k),
                      client_seed(self.seed, self.round, k))
            for k in clients
        ]
        return batched_client_steps(
            self.method, self.slots, global_state, jobs, self.train, self.task.kind,
            self.config.batch_clients,
        )

    def is_eval_round(self, round_: int) -> bool:
        return round_ % self.config.eval_every == 0 or round_ == self.train.rounds

    def private_state(self, k: int) -> TensorDict:
        state = self.private.get(k)
        if state is None:
            state = self.method.init_private(self.initial_private, self.task.clients[k])
        return state

    # -- evaluation --------------------------------------------------------------------------
    def client_model(self, k: int) -> nn.Module:
        """The scratch model loaded with client k's personalized state."""
        self.slots.load(self.global_state)
        self.slots.load(self.private_state(k))
        return self.model

    def evaluate(self, clients: Sequence[int] | None = None) -> dict[str, float]:
        """Test metrics summed over clients, overall and per cluster, and cluster recovery."""
        ids = range(len(self.task.clients)) if clients is None else clients
        per_client = {}
        for k in ids:
            data = self.task.clients[k]
            model = self.client_model(k)
            per_client[k] = evaluate(
                model, data.x_test, data.y_test, self.task.kind, self.train.eval_batch_size
            )
        metrics = summarize(per_client, self.task.clients, self.task.kind)
        metrics.update(self.router_recovery())
        return metrics

    def router_recovery(self) -> dict[str, float]:
        """ARI of every client's argmax pi against its true cluster (`router_ari`) and the mean
        max pi (`router_confidence`); empty when the method learns no router.

        Over all clients, whichever were evaluated: a partition is judged as a whole.
        """
        weights_of = self.method.router_weights
        if weights_of(self.private_state(0)) is None:
            return {}
        num_clients = len(self.task.clients)
        weights = torch.stack([weights_of(self.private_state(k)) for k in range(num_clients)])
        clusters = torch.tensor([client.cluster for client in self.task.clients])
        return router_recovery(weights, clusters)

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> TensorDict:
        """Everything a resumed run needs, as one flat dict of tensors."""
        state = {f"global/{k}": v for k, v in self.global_state.items()}
        state.update({f"server/{k}": v for k, v in self.server_optimizer.state_dict().items()})
        for client, tensors in self.private.items():
            state.update({f"private/{client}/{k}": v for k, v in tensors.items()})
        state["engine/round"] = torch.tensor(self.round)
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        check_state_names(state, set(self.global_state), set(self.initial_private))
        self.global_state = {k[7:]: v.clone() for k, v in state.items() if k.startswith("global/")}
        self.server_optimizer.load_state_dict(
            {k[7:]: v for k, v in state.items() if k.startswith("server/")}
        )
        self.private = {}
        for key, value in state.items():
            if key.startswith("private/"):
                _, client, name = key.split("/", 2)
                self.private.setdefault(int(client), {})[name] = value.clone()
        self.round = int(state["engine/round"])


def check_state_names(
    state: Mapping[str, torch.Tensor], global_names: set[str], private_names: set[str]
) -> None:
    """A saved state must hold exactly the model's tensors: one written by another method,
    model or version of a method stops here, in one line, instead of mid-run. A state with no
    private tensors yet (no client trained) matches any private names."""
    found_global = {k[7:] for k in state if k.startswith("global/")}
    found_private = {k.split("/", 2)[2] for k in state if k.startswith("private/")}
    problem = _name_mismatch("global", found_global, global_names)
    if problem is None and found_private:
        problem = _name_mismatch("private", found_private, private_names)
    if problem is not None:
        raise ConfigError(
            f"the saved state {problem}, which this run's model does not match: it was "
            "written by another method, model or floral version; delete it to start afresh"
        )


def _name_mismatch(kind: str, found: set[str], expected: set[str]) -> str | None:
    if extra := sorted(found - expected):
        return f"has {kind} tensor {extra[0]!r}"
    if missing := sorted(expected - found):
        return f"lacks {kind} {missing[0]!r}"
    return None


def summarize(
    results: Mapping[int, EvalResult], clients: Sequence[ClientData], kind: str
) -> dict[str, float]:
    """Weighted metrics over clients, overall and per cluster: accuracy (%), MSE or perplexity
    (of all test tokens together), and loss."""
    groups: dict[str, list[EvalResult]] = {"": list(results.values())}
    for k, result in results.items():
        groups.setdefault(f"_cluster{clients[k].cluster}", []).append(result)
    name = metric_name(kind)
    metrics: dict[str, float] = {}
    for suffix, items in sorted(groups.items()):
        count = sum(r.count for r in items)
        score = sum(r.score_sum for r in items) / max(count, 1)
        metrics[name + suffix] = _headline(score, kind)
        metrics["loss" + suffix] = sum(r.loss_sum for r in items) / max(count, 1)
    return metrics


def metric_name(kind: str) -> str:
    """The headline metric: test accuracy (%) for classification, test MSE for regression,
    test perplexity for causal language models."""
    return {"classification": "accuracy", "causal-lm": "perplexity"}.get(kind, "mse")


def _headline(score: float, kind: str) -> float:
    if kind == "classification":
        return 100.0 * score
    if kind == "causal-lm":
        return math.exp(min(score, 700.0))  # exp overflows past ~709
    return score
