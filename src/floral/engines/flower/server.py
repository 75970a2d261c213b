"""The server side: the local engine's rounds, with every client step on the client's own node.

`FlowerServer` mirrors `LocalEngine.run_round` exactly: the same client sampling and seeds, the
same download and upload codecs, the method's own `server_update` on the decoded uploads (taken
in client order, so sums are bitwise those of the local engine). It never builds the task or the
model: nodes report their partition, cluster and data size, and one of them sends the initial
global tensors, which every node must have built identically (checked by digest).

Every reply is checked before it counts (`checks.method_check`); a bad or missing one is logged
and dropped, and the round goes on with the others.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp

from floral.comm import build_codec
from floral.engines.flower.checks import method_check, tensors_digest
from floral.engines.flower.client import experiment_text
from floral.engines.flower.options import (
    RESUME_UNAVAILABLE,
    FlowerOptions,
    experiment_from_run_config,
    options_from_run_config,
)
from floral.engines.flower.records import (
    CONFIG,
    EVAL,
    GLOBAL,
    INITIAL,
    METRICS,
    NODE,
    UPLOAD,
    from_record,
    to_record,
)
from floral.engines.local import RoundResult, metric_name, sample_clients, summarize
from floral.errors import ConfigError, FloralError
from floral.experiment import ExperimentConfig, ProgressFn, RunSummary, resolve_config, run_rounds
from floral.train.evaluate import EvalResult
from floral.train.optim import ServerOptimizer, build_server_optimizer
from floral.train.recovery import router_recovery
from floral.train.state import TensorDict, payload_bytes

__all__ = ["ClientInfo", "FlowerServer", "serve", "server_app"]

# A child of Flower's logger, so floral's lines appear wherever Flower's do (`flwr log`, ...).
log = logging.getLogger("flwr.floral")

K = TypeVar("K")


@dataclass
class ClientInfo:
    """What the server knows of a client: where it is, never its data or private tensors."""

    node_id: int
    cluster: int
    digest: str  # of the initial global tensors it built


class FlowerServer:
    """Runs a floral experiment over a Flower `Grid`; an `Engine` for `run_rounds`."""

    def __init__(
        self, grid: Grid, config: ExperimentConfig, options: FlowerOptions | None = None
    ) -> None:
        if config.engine.eval_clients not in ("all", "sampled"):
            raise ConfigError(
                f"engine.eval_clients: unknown {config.engine.eval_clients!r} "
                "(choose from all, sampled)"
            )
        self.grid, self.config, self.options = grid, config, options or FlowerOptions()
        self.method = config.build_method()
        self.down = build_codec(config.comm.download, "comm.download")
        self.up = build_codec(config.comm.upload, "comm.upload")
        self.server_optimizer = build_server_optimizer(config.train)
        self.experiment = experiment_text(config)
        self.round = 0
        self.clients, self.kind, offered = self._discover()
        self.global_state: TensorDict = self._initial_state(offered)

    # -- setting up ------------------------------------------------------------------------------
    def _discover(self) -> tuple[dict[int, ClientInfo], str, TensorDict]:
        """Ask every connected node which client it holds; the first also sends its initial
        global tensors, which saves a round trip when they are the ones most nodes built."""
        wanted = self.config.task.num_clients
        nodes = self._wait_for_nodes(wanted)
        replies = self._exchange({n: self._query(n, send_initial=n == nodes[0]) for n in nodes})
        offered = _initial_tensors(replies.get(nodes[0])) if nodes else {}
        clients: dict[int, ClientInfo] = {}
        kinds: set[str] = set()
        for node_id, reply in sorted(replies.items()):
            try:
                k, info, kind = _read_hello(reply, node_id)
            except ValueError as error:
                log.warning("node %d left out: %s", node_id, error)
                continue
            if k in clients:
                log.warning("node %d also claims client %d; left out", node_id, k)
                continue
            clients[k] = info
            kinds.add(kind)
        if not clients:
            raise FloralError("no Flower node answered as a floral client; see the nodes' logs")
        if len(kinds) > 1:
            raise FloralError(f"nodes disagree on the task kind: {sorted(kinds)}")
        missing = sorted(set(range(wanted)) - set(clients))
        if missing:
            log.warning("clients %s have no node; they are skipped when sampled", missing)
        return clients, kinds.pop(), offered

    def _wait_for_nodes(self, wanted: int) -> list[int]:
        deadline = time.monotonic() + self.options.node_timeout
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= wanted or time.monotonic() > deadline:
                break
            time.sleep(self.options.poll_interval)
        log.info("%d of %d nodes connected", len(nodes), wanted)
        return nodes

    def _initial_state(self, offered: TensorDict) -> TensorDict:
        """The initial global tensors all (or most) nodes built; nodes that differ are left out."""
        digest, _ = Counter(c.digest for c in self.clients.values()).most_common(1)[0]
        for k in [k for k, c in self.clients.items() if c.digest != digest]:
            log.warning(
                "client %d built a different initial model (another floral version or "
                "experiment?); left out", k,
            )
            del self.clients[k]
        if offered and tensors_digest(offered) == digest:
            return offered
        source = min(self.clients)
        reply = self._exchange({source: self._query(self.clients[source].node_id, True)})
        state = _initial_tensors(reply.get(source))
        if tensors_digest(state) != digest:
            raise FloralError(f"client {source} did not send the initial tensors it built")
        return state

    def _query(self, node_id: int, send_initial: bool) -> Message:
        config = ConfigRecord(
            {"experiment": self.experiment, "round": self.round, "send_initial": send_initial}
        )
        return Message(RecordDict({CONFIG: config}), node_id, MessageType.QUERY)

    # -- one round -------------------------------------------------------------------------------
    def run_round(self) -> RoundResult:
        """Train the sampled clients on their nodes, check and aggregate, evaluate when due."""
        self.round += 1
        start = time.perf_counter()
        sampled = sample_clients(
            self.config.seed, self.round, self.config.task.num_clients,
            self.config.train.clients_per_round,
        )
        clients = self._reachable(sampled)
        payload = self.down.encode(self.global_state)
        replies = self._exchange(self._messages(clients, MessageType.TRAIN, to_record(payload)))
        uploads, losses, bytes_up = [], [], 0
        for k in sorted(replies):  # client order: the same sums as the local engine
            upload, loss, arrived = self._read_upload(k, replies[k])
            bytes_up += arrived  # what crossed the network, kept or dropped
            if upload is not None:
                uploads.append(upload)
                losses.append(loss)
        self.global_state = self.method.server_update(
            self.global_state, uploads, self.server_optimizer
        )
        loss = float(np.mean(losses)) if losses else float("nan")
        result = RoundResult(
            self.round, time.perf_counter() - start, payload_bytes(payload) * len(clients),
            bytes_up, clients, loss,
        )
        if self.is_eval_round(self.round):
            result.eval = self.evaluate(clients if self.config.engine.eval_clients == "sampled"
                                        else None)
        return result

    def is_eval_round(self, round_: int) -> bool:
        return round_ % self.config.engine.eval_every == 0 or round_ == self.config.train.rounds

    def _reachable(self, sampled: Sequence[int]) -> list[int]:
        absent = [k for k in sampled if k not in self.clients]
        if absent:
            log.warning("round %d: clients %s have no node; skipped", self.round, absent)
        return [k for k in sampled if k in self.clients]

    def _read_upload(self, k: int, reply: Message) -> tuple[TensorDict | None, float, int]:
        """(decoded upload, or None when the reply is dropped; train loss; bytes that arrived)."""
        payload: TensorDict = {}
        try:
            payload = from_record(_record(reply, UPLOAD, ArrayRecord))
            loss = float(_record(reply, METRICS, MetricRecord).get("train_loss", math.nan))
            upload = self.up.decode(payload)
            problems = method_check(self.method, self.global_state, upload, self._fresh_optimizer)
        except (ValueError, KeyError, TypeError, RuntimeError) as error:
            problems = [str(error)]
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            self._drop(k, "; ".join(problems[:3]) + more)
            return None, math.nan, payload_bytes(payload)
        return upload, loss, payload_bytes(payload)

    def _fresh_optimizer(self) -> ServerOptimizer:
        return build_server_optimizer(self.config.train)

    def _drop(self, k: int, reason: str) -> None:
        node_id = self.clients[k].node_id
        log.warning("round %d: dropped the reply of client %d (node %d): %s",
                    self.round, k, node_id, reason)

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate(self, clients: Sequence[int] | None = None) -> dict[str, float]:
        """Test metrics over clients, overall and per cluster, and cluster recovery: the local
        engine's numbers, computed from sums and router summaries the nodes send back."""
        targets = sorted(self.clients) if clients is None else self._reachable(clients)
        # The server's exact tensors, not the download codec's view: the local engine evaluates
        # its own global state, and evaluation traffic is not part of a round's bytes.
        record = to_record(self.global_state)
        replies = self._exchange(self._messages(targets, MessageType.EVALUATE, record))
        results, routers = self._read_evaluations(replies)
        others = [k for k in sorted(self.clients) if k not in set(targets)]
        if routers and others:  # recovery is judged over all clients: ask the rest for routers
            routers.update(self._read_evaluations(
                self._exchange(self._messages(others, MessageType.EVALUATE, None))
            )[1])
        metrics = summarize(results, self.clients, self.kind)  # type: ignore[arg-type]
        if routers:
            metrics.update(self._router_recovery(routers))
        return metrics

    def _read_evaluations(
        self, replies: Mapping[int, Message]
    ) -> tuple[dict[int, EvalResult], dict[int, tuple[int, float]]]:
        results: dict[int, EvalResult] = {}
        routers: dict[int, tuple[int, float]] = {}
        for k in sorted(replies):
            try:
                sums = _record(replies[k], EVAL, MetricRecord)
                if "count" in sums:
                    results[k] = _eval_result(sums)
                if "router_choice" in sums:
                    routers[k] = int(sums["router_choice"]), float(sums["router_confidence"])
            except (ValueError, KeyError, TypeError) as error:
                self._drop(k, f"evaluation: {error}")
        return results, routers

    def _router_recovery(self, routers: Mapping[int, tuple[int, float]]) -> dict[str, float]:
        """`router_recovery` on weights rebuilt from (argmax, max) per client: a row holding only
        its max at its argmax has the same argmax and max as the client's pi."""
        ks = sorted(routers)
        choices = torch.tensor([routers[k][0] for k in ks])
        weights = torch.zeros(len(ks), int(choices.max()) + 1)
        weights[torch.arange(len(ks)), choices] = torch.tensor([routers[k][1] for k in ks])
        clusters = torch.tensor([self.clients[k].cluster for k in ks])
        return router_recovery(weights, clusters)

    # -- messages --------------------------------------------------------------------------------
    def _messages(
        self, clients: Sequence[int], kind: str, record: ArrayRecord | None
    ) -> dict[int, Message]:
        content = RecordDict(
            {CONFIG: ConfigRecord({"experiment": self.experiment, "round": self.round})}
        )
        if record is not None:
            content[GLOBAL] = record
        return {
            k: Message(content, self.clients[k].node_id, kind, group_id=str(self.round))
            for k in clients
        }

    def _exchange(self, messages: Mapping[K, Message]) -> dict[K, Message]:
        """Push the messages, pull replies until all arrived or `round_timeout` passed."""
        keys = list(messages)
        sent = list(self.grid.push_messages(list(messages.values())))
        pushed = {m.metadata.message_id: key for key, m in messages.items()}
        waiting = {mid: pushed[mid] for mid in sent if mid in pushed}
        for key in set(keys) - set(waiting.values()):
            log.warning("round %d: the message to %s could not be sent", self.round, key)
        replies: dict[K, Message] = {}
        deadline = time.monotonic() + self.options.round_timeout
        while waiting and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(waiting)):
                key = waiting.pop(reply.metadata.reply_to_message_id, None)
                if key is not None:
                    replies[key] = reply
            if waiting:
                time.sleep(self.options.poll_interval)
        for key in waiting.values():
            log.warning("round %d: no reply from %s within %.0f s; dropped",
                        self.round, key, self.options.round_timeout)
        return replies

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> TensorDict:
        """Global and server-optimizer tensors; private ones stay on the nodes."""
        state = {f"global/{k}": v for k, v in self.global_state.items()}
        state.update({f"server/{k}": v for k, v in self.server_optimizer.state_dict().items()})
        state["engine/round"] = torch.tensor(self.round)
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        raise ConfigError(RESUME_UNAVAILABLE)


# -- reading replies ------------------------------------------------------------------------------
R = TypeVar("R")


def _record(reply: Message, name: str, kind: type[R]) -> R:
    if reply.has_error():
        reason = str(reply.error.reason or "").strip().splitlines()
        raise ValueError(f"the client failed: {reason[-1] if reason else reply.error.code}")
    if name not in reply.content:
        raise ValueError(f"the reply has no {name!r} record")
    record = reply.content[name]
    if not isinstance(record, kind):
        raise ValueError(f"{name!r} is not a {kind.__name__}")
    return record


def _initial_tensors(reply: Message | None) -> TensorDict:
    if reply is None or reply.has_error() or INITIAL not in reply.content:
        return {}
    try:
        return from_record(reply.content[INITIAL])
    except ValueError as error:
        log.warning("unreadable initial tensors: %s", error)
        return {}


def _read_hello(reply: Message, node_id: int) -> tuple[int, ClientInfo, str]:
    info = _record(reply, NODE, ConfigRecord)
    try:
        k, cluster = int(info["partition_id"]), int(info["cluster"])
        return k, ClientInfo(node_id, cluster, str(info["initial_digest"])), str(info["kind"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"malformed {NODE!r} record ({error})") from None


def _eval_result(sums: Mapping[str, float]) -> EvalResult:
    loss_sum, score_sum, count = (sums[key] for key in ("loss_sum", "score_sum", "count"))
    if not (math.isfinite(loss_sum) and math.isfinite(score_sum)) or int(count) < 0:
        raise ValueError(f"non-finite or negative sums {dict(sums)}")
    return EvalResult(float(loss_sum), float(score_sum), int(count))


# -- the ServerApp --------------------------------------------------------------------------------
def serve(
    grid: Grid,
    config: ExperimentConfig,
    out: Path,
    options: FlowerOptions | None = None,
    on_round: ProgressFn | None = None,
) -> RunSummary:
    """Run `config` over the grid's nodes, writing the usual results folder to `out`."""
    engine = FlowerServer(grid, config, options)
    return run_rounds(engine, config, out, metric_name(engine.kind), on_round=on_round)


def _log_round(result: RoundResult, latest: Mapping[str, float]) -> None:
    headline = ("accuracy", "mse", "loss", "router_ari")
    shown = {k: round(v, 4) for k, v in latest.items() if k in headline}
    suffix = f" {shown}" if result.eval else ""
    log.info("round %d: %d clients, train loss %.4f%s", result.round, len(result.clients),
             result.train_loss, suffix)


server_app = ServerApp()


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    data, overrides = experiment_from_run_config(context.run_config)
    config = resolve_config(data, [*overrides, "engine.name=flower"])
    out = Path(config.output.dir or Path("results") / config.name).absolute()
    summary = serve(grid, config, out, options_from_run_config(context.run_config), _log_round)
    log.info("%s: final %s = %.4f; results in %s", config.name, summary.metric,
             summary.final[summary.metric], out)
