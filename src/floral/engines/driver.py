"""The round loop, written once: a server-side driver over a transport that runs client steps.

A round samples clients from (seed, round) alone, encodes the global tensors once with the
download codec, has the transport run the sampled clients' steps where they live (in this
process, or on Flower nodes), decodes and checks every upload (`Method.check_upload`: a bad
one is logged and dropped, and the round goes on), and hands the rest, in client order, to the
method's server update with the server's state (`ServerState`: global tensors and the method's
own) and the server optimizer. Evaluation runs on the schedule of `[engine]`, the same for
every transport; cluster recovery is judged from each client's (argmax pi, max pi), never from
the router itself.

Everything a resumed run needs is in `state_dict`: the global tensors, the method's server
state, the server optimizer, the round, and what the transport keeps for its clients.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from floral.comm import CommConfig, Dense, build_codec
from floral.engines.aggregation import RoundInfo, aggregation_for
from floral.engines.config import EngineConfig, check_engine_config
from floral.errors import ConfigError, DivergedError, RoundFailedError
from floral.methods.base import Method, ServerState, UploadBatch
from floral.methods.checks import all_finite
from floral.train.loop import TrainConfig
from floral.train.objective import EvalResult, Objective
from floral.train.optim import build_server_optimizer
from floral.train.privacy import dp_epsilon, secret_rng
from floral.train.recovery import router_recovery
from floral.train.state import TensorDict, payload_bytes
from floral.train.text_metrics import generation_metrics

__all__ = [
    "Driver",
    "Evaluated",
    "Observer",
    "RoundResult",
    "Trained",
    "Transport",
    "check_round_minimum",
    "check_state_names",
    "client_seed",
    "router_summary",
    "sample_clients",
    "summarize",
]


NO_NODE = "it has no node"


@dataclass
class RoundResult:
    round: int
    seconds: float
    bytes_down: int
    bytes_up: int
    clients: list[int]  # sampled and reachable: sent the round's training message
    train_loss: float  # mean over the applied updates
    eval: dict[str, float] = field(default_factory=dict)  # empty on rounds without evaluation
    applied: int = 0  # updates that reached the aggregation
    dropped: dict[int, str] = field(default_factory=dict)  # sampled client -> why not applied


@dataclass
class Trained:
    """One client's reply to a training message, as it reached the server."""

    payload: TensorDict  # the upload as the upload codec encoded it: what crossed the network
    train_loss: float
    # Clients trained together in this process: their stacked uploads, checked at once where
    # the payload is still the client's row (`Method.check_upload_batch`).
    batch: UploadBatch | None = None


@dataclass
class Evaluated:
    """One client's reply to an evaluation message."""

    result: EvalResult | None  # test sums, when the message carried the global tensors
    router: tuple[int, float] | None  # (argmax pi, max pi) for methods that learn a router


class Transport(Protocol):
    """Runs client steps where the clients are; knows no method and no schedule.

    A reply is the client's answer, or a one-line reason why there is none (the driver logs
    it and goes on without that client)."""

    clusters: Mapping[int, int]  # the reachable clients: id -> true cluster
    # Whether a round's replies carry only the sum of the uploads (Flower's SecAgg+): then
    # no aggregation policy that reads each upload may run.
    sums_uploads: bool
    @property
    def left_out(self) -> Mapping[int, str]:
        """Nodes that hold no client of this run, and why (empty where all are in reach)."""
        ...

    def train(
        self, round_: int, clients: Sequence[int], payload: TensorDict
    ) -> Mapping[int, Trained | str]: ...

    def evaluate(
        self, round_: int, clients: Sequence[int], global_state: TensorDict | None
    ) -> Mapping[int, Evaluated | str]: ...

    def state_dict(self) -> TensorDict: ...

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None: ...


def sample_clients(
    seed: int, round_: int, num_clients: int, fraction: float,
    rng: np.random.Generator | None = None,
) -> list[int]:
    """The clients of one round: a draw without replacement, sorted; seeded by (seed, round)
    unless `rng` is given (a DP run's secret one)."""
    count = max(1, round(fraction * num_clients))
    rng = rng or np.random.default_rng([seed, round_, 0x5A])
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


def router_summary(method: Method, private: Mapping[str, torch.Tensor]) -> tuple[int, float] | None:
    """What cluster recovery needs of a client's router: which adaptor leads and by how much."""
    weights = method.router_weights(private)
    if weights is None:
        return None
    return int(weights.argmax()), float(weights.max())


class Observer:
    """Watches the round loop: recording, checkpoints, trackers and progress are observers.
    Every hook does nothing unless a subclass says otherwise."""

    def started(self, driver: Driver) -> None:
        """Before the first round this run will train."""

    def round_done(self, driver: Driver, result: RoundResult) -> None:
        """After each whole round (its server update applied, evaluated when due)."""

    def stopped(self, driver: Driver, error: BaseException) -> None:
        """The loop stopped early (a divergence, an interrupt); the driver holds the last
        whole round's state."""

    def finished(self, driver: Driver) -> None:
        """After the last round, when the loop ended normally."""

    def closed(self, driver: Driver) -> None:
        """Always, last: release what the observer holds open."""


class Driver:
    """Runs a method's rounds over a transport: sampling, codecs, checks, the aggregation
    policy, the server update and evaluation; observers record, checkpoint and report."""

    def __init__(
        self,
        method: Method,
        transport: Transport,
        initial: ServerState,
        objective: Objective,
        num_clients: int,
        train: TrainConfig,
        config: EngineConfig | None = None,
        comm: CommConfig | None = None,
        seed: int = 0,
        log: logging.Logger | None = None,
    ) -> None:
        config, comm = config or EngineConfig(), comm or CommConfig()
        check_engine_config(config)
        if not 0 < train.clients_per_round <= 1:
            raise ConfigError(
                f"train.clients_per_round: must be in (0, 1], got {train.clients_per_round}"
            )
        check_round_minimum(config, train, num_clients)
        self.aggregation = aggregation_for(train, method, num_clients, comm.upload,
                                           secure=transport.sums_uploads)
        self.method, self.transport, self.objective = method, transport, objective
        self.num_clients, self.train, self.config, self.seed = num_clients, train, config, seed
        self.down = build_codec(comm.download, "comm.download")
        self.up = build_codec(comm.upload, "comm.upload")
        self.state = initial
        self.server_optimizer = build_server_optimizer(train)
        self.log = log or logging.getLogger("floral")
        self.round = 0
        # The initial model's test loss (the round-0 evaluation): the level a diverging run's
        # training loss climbs far above (`engine.divergence_factor`).
        self.start_loss: float | None = None

    @property
    def global_state(self) -> TensorDict:
        return self.state.global_state

    def run(self, observers: Sequence[Observer] = ()) -> list[RoundResult]:
        """Run rounds until `train.rounds`, telling the observers, in their order; returns
        what each round reported. This is the one round loop of every engine."""
        for observer in observers:
            observer.started(self)
        results = []
        try:
            while self.round < self.train.rounds:
                results.append(self.run_round())
                for observer in observers:
                    observer.round_done(self, results[-1])
        except (DivergedError, RoundFailedError, KeyboardInterrupt) as error:
            for observer in observers:
                observer.stopped(self, error)
            raise
        finally:
            for observer in observers:
                observer.closed(self)
        for observer in observers:
            observer.finished(self)
        return results

    # -- one round ---------------------------------------------------------------------------
    def run_round(self) -> RoundResult:
        """Train the sampled clients, check and aggregate their uploads, evaluate when due."""
        self.round += 1
        start = time.perf_counter()
        # Under differential privacy, who is sampled is secret: the accountant's amplification
        # by subsampling assumes nobody can tell.
        secret = secret_rng() if self.train.dp_clip > 0 else None
        sampled = sample_clients(
            self.seed, self.round, self.num_clients, self.train.clients_per_round, secret
        )
        clients = self._reachable(sampled)
        dropped = {k: NO_NODE for k in sampled if k not in clients}
        # Every sampled client receives the same payload: encode once, count it per client.
        payload = self.down.encode(self.state.global_state)
        replies = self.transport.train(self.round, clients, payload)
        uploads, losses, bytes_up, diverged = [], [], 0, 0
        cleared = self._cleared(replies)
        for k in clients:  # client order: sums do not depend on the transport
            reply = replies.get(k, "no reply")
            if isinstance(reply, str):
                dropped[k] = self._drop(k, reply)
                continue
            bytes_up += payload_bytes(reply.payload)  # what crossed the network, kept or not
            upload, problem = self._checked(reply.payload, k in cleared)
            if upload is not None:
                uploads.append(upload)
                losses.append(reply.train_loss)
                continue
            dropped[k] = self._drop(k, problem)
            if not (math.isfinite(reply.train_loss) and all_finite(reply.payload)):
                diverged += 1
        if diverged and not uploads:
            self._diverged(f"every client's update diverged ({diverged} of {len(clients)})",
                           start_suspect=True)
        self._enough(len(uploads), len(sampled), dropped)
        # A client without training examples has no loss (NaN); it does not count.
        scored = [loss for loss in losses if not math.isnan(loss)]
        train_loss = float(np.mean(scored)) if scored else math.nan
        self._check_loss(train_loss, bool(scored))
        combined = self.aggregation.combine(uploads, RoundInfo(self.round, len(sampled)))
        new = self.method.server_update(self.state, combined, self.server_optimizer)
        if not all_finite(new.global_state):
            self._diverged("the global model is no longer finite (NaN or infinity)")
        self.state = new
        result = RoundResult(
            self.round, time.perf_counter() - start, payload_bytes(payload) * len(clients),
            bytes_up, clients, train_loss, applied=len(uploads),
            dropped=dict(sorted(dropped.items())),
        )
        if self.is_eval_round(self.round):
            result.eval = self.evaluate(clients if self.config.eval_clients == "sampled" else None)
        return result

    def _check_loss(self, loss: float, trained: bool) -> None:
        """The divergence rule: a round whose mean training loss is not finite, or over
        `engine.divergence_factor` times the initial model's test loss, did not happen."""
        if trained and not math.isfinite(loss):
            self._diverged("the training loss is not finite", start_suspect=True)
        factor, start = self.config.divergence_factor, self.start_loss
        if factor > 0 and start is not None and start > 0 and loss > factor * start:
            self._diverged(f"the training loss {loss:.4g} is over {factor:g} times the initial "
                           f"model's test loss {start:.4g} (engine.divergence_factor)",
                           start_suspect=True)

    def _enough(self, applied: int, sampled: int, dropped: Mapping[int, str]) -> None:
        """Stop at the last good state when the round applied fewer updates than
        `engine.min_fit_clients`, or dropped any while `engine.accept_failures` is false."""
        config = self.config
        if applied >= config.min_fit_clients and (config.accept_failures or not dropped):
            return
        why = "; ".join(f"client {k}: {reason}" for k, reason in sorted(dropped.items()))
        # Why clients have no node is the nodes' story (a Flower node whose data failed).
        left_out = list(self.transport.left_out.items())
        if left_out and any(reason == NO_NODE for reason in dropped.values()):
            more = f"; and {len(left_out) - 3} more" if len(left_out) > 3 else ""
            why += "; nodes left out: " + "; ".join(
                f"node {n}: {reason}" for n, reason in left_out[:3]) + more
        rule = (f"fewer than engine.min_fit_clients = {config.min_fit_clients}"
                if applied < config.min_fit_clients else "engine.accept_failures = false")
        self.round -= 1
        raise RoundFailedError(f"round {self.round + 1}: {applied} of {sampled} updates applied, "
                               f"{rule} ({why or 'no client was sampled'})")

    def is_eval_round(self, round_: int) -> bool:
        return round_ % self.config.eval_every == 0 or round_ == self.train.rounds

    def _reachable(self, sampled: Sequence[int]) -> list[int]:
        absent = [k for k in sampled if k not in self.transport.clusters]
        if absent:
            self.log.warning("round %d: clients %s have no node; skipped", self.round, absent)
        return [k for k in sampled if k in self.transport.clusters]

    def _cleared(self, replies: Mapping[int, Trained | str]) -> set[int]:
        """The clients whose upload is still their row of a batch of stacked uploads (dense
        codec: decoding changes nothing) that the method's check accepts as a whole."""
        if not isinstance(self.up, Dense):
            return set()
        batches: dict[int, tuple[UploadBatch, list[int]]] = {}
        for k, reply in replies.items():
            if isinstance(reply, Trained) and reply.batch is not None \
                    and reply.batch.holds(k, reply.payload):
                batches.setdefault(id(reply.batch), (reply.batch, []))[1].append(k)
        cleared: set[int] = set()
        for batch, members in batches.values():
            if self.method.check_upload_batch(self.state, batch):
                cleared.update(members)
        return cleared

    def _checked(self, payload: TensorDict, cleared: bool = False) -> tuple[TensorDict | None, str]:
        """(the decoded upload, "") or (None, why it may not be aggregated); an upload
        `cleared` with its batch is not checked again."""
        try:
            upload = self.up.decode(payload)
            problems = [] if cleared else self.method.check_upload(self.state, upload)
        except (ValueError, KeyError, TypeError, RuntimeError) as error:
            problems = [str(error)]
        if not problems:
            return upload, ""
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        return None, "; ".join(problems[:3]) + more

    def _diverged(self, what: str, start_suspect: bool = False) -> None:
        """Stop at the last good state: this round did not happen (and where its training
        diverged from the state it started from, observers keep the one before)."""
        self.round -= 1
        raise DivergedError(f"round {self.round + 1}: {what}", start_suspect)

    def _drop(self, k: int, reason: str) -> str:
        self.log.warning("round %d: dropped the reply of client %d: %s", self.round, k, reason)
        return reason

    # -- evaluation --------------------------------------------------------------------------
    def router_weights(self) -> dict[int, torch.Tensor]:
        """Each client's learned mixture weights pi, where this engine holds the clients'
        private states (in this process); none where they stay on their nodes."""
        return {}

    def evaluate(self, clients: Sequence[int] | None = None) -> dict[str, float]:
        """Test metrics summed over clients, overall and per cluster, and cluster recovery.

        The server's exact global tensors are evaluated, not the download codec's view, and
        evaluation traffic is not part of a round's bytes."""
        everyone = sorted(self.transport.clusters)
        targets = everyone if clients is None else self._reachable(clients)
        results, routers = self._evaluations(targets, self.state.global_state)
        others = [k for k in everyone if k not in set(targets)]
        if routers and others:  # recovery is judged over all clients: ask the rest for routers
            routers.update(self._evaluations(others, None)[1])
        metrics = summarize(results, self.transport.clusters, self.objective)
        metrics["clients_evaluated"] = len(results)  # what the metrics cover: replies counted
        if self.round == 0 and clients is None and math.isfinite(metrics.get("loss", math.nan)):
            self.start_loss = metrics["loss"]
        if routers:
            metrics.update(self._router_recovery(routers))
        if self.train.dp_clip > 0:
            metrics["dp_epsilon"] = self.dp_epsilon()
            metrics["dp_delta"] = self.train.dp_delta
        return metrics

    def dp_epsilon(self) -> float:
        """The privacy spent so far at `train.dp_delta`. Central: the server's noisy sums, with
        the amplification of sampling a fraction of the clients. Local: what one client's own
        noisy updates reveal, as if it had been sampled every round (an upper bound)."""
        train = self.train
        q = max(1, round(train.clients_per_round * self.num_clients)) / self.num_clients
        if train.dp_mode == "local":
            q = 1.0
        return dp_epsilon(q, train.dp_noise, self.round, train.dp_delta)

    def _evaluations(
        self, clients: Sequence[int], global_state: TensorDict | None
    ) -> tuple[dict[int, EvalResult], dict[int, tuple[int, float]]]:
        replies = self.transport.evaluate(self.round, clients, global_state)
        results: dict[int, EvalResult] = {}
        routers: dict[int, tuple[int, float]] = {}
        for k in sorted(replies):
            reply = replies[k]
            if isinstance(reply, str):
                self._drop(k, f"evaluation: {reply}")
                continue
            if reply.result is not None:
                results[k] = reply.result
            if reply.router is not None:
                routers[k] = reply.router
        return results, routers

    def _router_recovery(self, routers: Mapping[int, tuple[int, float]]) -> dict[str, float]:
        """`router_recovery` on weights rebuilt from (argmax, max) per client: a row holding only
        its max at its argmax has the same argmax and max as the client's pi."""
        ks = sorted(routers)
        choices = torch.tensor([routers[k][0] for k in ks])
        weights = torch.zeros(len(ks), int(choices.max()) + 1)
        weights[torch.arange(len(ks)), choices] = torch.tensor([routers[k][1] for k in ks])
        clusters = torch.tensor([self.transport.clusters[k] for k in ks])
        return router_recovery(weights, clusters)

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> TensorDict:
        """Everything a resumed run needs, as one flat dict of tensors."""
        state = {f"global/{k}": v for k, v in self.state.global_state.items()}
        state.update({f"method/{k}": v for k, v in self.state.method_state.items()})
        state.update({f"server/{k}": v for k, v in self.server_optimizer.state_dict().items()})
        state.update(self.transport.state_dict())
        state["engine/round"] = torch.tensor(self.round)
        if self.start_loss is not None:
            state["engine/start_loss"] = torch.tensor(self.start_loss, dtype=torch.float64)
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for prefix, tensors in (("global", self.state.global_state),
                                ("method", self.state.method_state)):
            check_state_names(prefix, _under(state, prefix), set(tensors))
        self.transport.load_state_dict(state)
        self.state = ServerState(
            {k: v.clone() for k, v in _under(state, "global").items()},
            {k: v.clone() for k, v in _under(state, "method").items()},
        )
        self.server_optimizer.load_state_dict(_under(state, "server"))
        self.round = int(state["engine/round"])
        start = state.get("engine/start_loss")  # absent from checkpoints of older runs
        self.start_loss = None if start is None else float(start)


def check_round_minimum(config: EngineConfig, train: TrainConfig, num_clients: int) -> None:
    """`engine.min_fit_clients` no larger than the clients a round samples."""
    sampled = max(1, round(train.clients_per_round * num_clients))
    if config.min_fit_clients > sampled:
        raise ConfigError(f"engine.min_fit_clients: {config.min_fit_clients} can never be met: "
                          f"a round samples {sampled} clients (train.clients_per_round = "
                          f"{train.clients_per_round:g} of {num_clients})")


def _under(state: Mapping[str, torch.Tensor], prefix: str) -> TensorDict:
    start = len(prefix) + 1
    return {k[start:]: v for k, v in state.items() if k.startswith(prefix + "/")}


def check_state_names(kind: str, found: Mapping[str, object], expected: set[str]) -> None:
    """A saved state must hold exactly the model's tensors: one written by another method,
    model or version of a method stops here, in one line, instead of mid-run."""
    problem = None
    if extra := sorted(set(found) - expected):
        problem = f"has {kind} tensor {extra[0]!r}"
    elif missing := sorted(expected - set(found)):
        problem = f"lacks {kind} {missing[0]!r}"
    if problem is not None:
        raise ConfigError(
            f"the saved state {problem}, which this run's model does not match: it was "
            "written by another method, model or floral version; delete it to start afresh"
        )


def summarize(
    results: Mapping[int, EvalResult], clusters: Mapping[int, int], objective: Objective
) -> dict[str, float]:
    """Weighted metrics over clients, overall and per cluster: accuracy (%), MSE or perplexity
    (of all test tokens together), and loss; where clients generated text, chrF and exact match
    (%) from their summed statistics, and every metric per client too (`_client<k>`)."""
    groups: dict[str, list[EvalResult]] = {"": list(results.values())}
    for k, result in results.items():
        groups.setdefault(f"_cluster{clusters[k]}", []).append(result)
    ordered = sorted(groups.items())
    if any(r.extra for r in results.values()):  # generated text: per client as well
        ordered += [(f"_client{k}", [results[k]]) for k in sorted(results)]
    metrics: dict[str, float] = {}
    for suffix, items in ordered:
        count = sum(r.count for r in items)
        score = sum(r.score_sum for r in items) / max(count, 1)
        metrics[objective.metric + suffix] = objective.headline(score)
        metrics["loss" + suffix] = sum(r.loss_sum for r in items) / max(count, 1)
        extra: dict[str, float] = {}
        for r in items:
            for key, value in r.extra.items():
                extra[key] = extra.get(key, 0.0) + value
        metrics.update({k + suffix: v for k, v in generation_metrics(extra).items()})
    return metrics
