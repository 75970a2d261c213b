"""The server side: a transport for the round driver whose clients are Flower nodes.

`FlowerTransport` sends each round's messages over a Flower `Grid` and reads the replies; the
driver (floral.engines.driver) does everything else exactly as for the local engine: sampling,
seeds, codecs, checks, the method's server update, evaluation. It never builds the task or the
model: nodes report their partition, cluster and data size, and one of them sends the initial
server state (global tensors and the method's own), which every node must have built
identically (checked by digest). Each node also reports a digest of its data, never the data:
two nodes with the same digest are named in one warning (`same_data`).

A reply that is missing, malformed or from a failed client becomes a one-line reason; the
driver logs it and the round goes on with the others.

Every message names the run's lineage, a random name drawn when the run starts and kept in its
checkpoints (`flower/lineage`): nodes keep their clients' private state under it, so a resumed
run finds that state on the nodes' disks and a new run starts afresh
(floral.engines.flower.store).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid

from floral.engines.driver import Evaluated, Trained
from floral.engines.flower.options import FlowerOptions
from floral.engines.flower.records import (
    CONFIG,
    EVAL,
    GENERATION_PREFIX,
    GLOBAL,
    INITIAL,
    INITIAL_STATE,
    METRICS,
    NODE,
    UPLOAD,
    error_reason,
    from_record,
    initial_digest,
    to_record,
)
from floral.engines.flower.secagg import SecureRound
from floral.errors import ConfigError, FloralError
from floral.methods.base import ServerState
from floral.train.objective import EvalResult
from floral.train.state import TensorDict

__all__ = ["ClientInfo", "FlowerTransport", "log", "same_data"]

# A child of Flower's logger, so floral's lines appear wherever Flower's do (`flwr log`, ...).
log = logging.getLogger("flwr.floral")

K = TypeVar("K")
LINEAGE_KEY = "flower/lineage"  # the transport's state in a checkpoint: 16 bytes
# While a round waits for replies: one line every this many seconds (a quarter of
# flower.round-timeout if that is less), saying how many are missing and how long is left.
WAIT_LOG_EVERY = 30.0


@dataclass
class ClientInfo:
    """What the server knows of a client: where it is, never its data or private tensors."""

    node_id: int
    cluster: int
    digest: str  # of the initial server state it built
    store: str = "memory"  # where it keeps private state: "disk" (survives restarts) or "memory"
    data_digest: str = ""  # of its data (floral.engines.flower.client), never the data


class FlowerTransport:
    """Client steps on Flower nodes; after construction, `kind` is the task kind the nodes
    report and `initial` the server state they built."""

    def __init__(
        self, grid: Grid, experiment: str, num_clients: int, options: FlowerOptions | None = None
    ) -> None:
        self.grid, self.experiment, self.options = grid, experiment, options or FlowerOptions()
        self.sums_uploads = self.options.secagg  # SecAgg+: the server sees only the sum
        self.round = 0
        self._seen: set[int] = set()  # every node asked which client it holds
        self.left_out: dict[int, str] = {}  # node id -> why it holds no client of this run
        self.lineage = secrets.token_hex(16)  # this run's name on the nodes; kept on resume
        self.nodes, self.kind, offered = self._discover(num_clients)
        self.initial = self._initial_state(offered)
        self.digest = initial_digest(self.initial)
        self._clusters = {k: info.cluster for k, info in self.nodes.items()}
        self.clusters: Mapping[int, int] = self._clusters  # grows when a client's node joins late

    # -- setting up ------------------------------------------------------------------------------
    def _discover(self, wanted: int) -> tuple[dict[int, ClientInfo], str, ServerState | None]:
        """Ask every connected node which client it holds; the first also sends its initial
        server state, which saves a round trip when it is the one most nodes built."""
        nodes = self._wait_for_nodes(wanted)
        self._seen.update(nodes)
        replies = self._exchange({n: self._query(n, send_initial=n == nodes[0]) for n in nodes})
        offered = _initial_state(replies.get(nodes[0])) if nodes else None
        clients: dict[int, ClientInfo] = {}
        kinds: set[str] = set()
        for node_id, reply in sorted(replies.items()):
            try:
                k, info, kind = _read_hello(reply, node_id)
            except ValueError as error:
                log.warning("node %d left out: %s", node_id, error)
                self.left_out[node_id] = str(error)
                continue
            if k in clients:
                log.warning("node %d also claims client %d; left out", node_id, k)
                self.left_out[node_id] = f"it also claims client {k}"
                continue
            clients[k] = info
            kinds.add(kind)
        for line in same_data(clients):
            log.warning(line)
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

    def _initial_state(self, offered: ServerState | None) -> ServerState:
        """The initial state all (or most) nodes built; nodes that differ are left out."""
        digest, _ = Counter(c.digest for c in self.nodes.values()).most_common(1)[0]
        for k in [k for k, c in self.nodes.items() if c.digest != digest]:
            log.warning(
                "client %d built a different initial model (another floral version or "
                "experiment?); left out", k,
            )
            self.left_out[self.nodes[k].node_id] = f"client {k}: it built a different initial model"
            del self.nodes[k]
        if offered is not None and initial_digest(offered) == digest:
            return offered
        source = min(self.nodes)
        reply = self._exchange({source: self._query(self.nodes[source].node_id, True)})
        state = _initial_state(reply.get(source))
        if state is None or initial_digest(state) != digest:
            raise FloralError(f"client {source} did not send the initial state it built")
        return state

    def _query(self, node_id: int, send_initial: bool) -> Message:
        config = ConfigRecord({"experiment": self.experiment, "round": self.round,
                               "lineage": self.lineage, "send_initial": send_initial})
        return Message(RecordDict({CONFIG: config}), node_id, MessageType.QUERY)

    def _rediscover(self) -> None:
        """Nodes that connected since the last round (a restarted SuperNode comes back with a
        new node id): ask which client they hold; from now on that client's messages go to
        its newest node, which reads its private state from its own disk. (A client that is
        sampled this round but had no node yet is still skipped: the driver chose already.)"""
        seen = {info.node_id for info in self.nodes.values()} | self._seen
        new = sorted(set(self.grid.get_node_ids()) - seen)
        if not new:
            return
        self._seen.update(new)
        replies = self._exchange({n: self._query(n, send_initial=False) for n in new})
        for node_id, reply in sorted(replies.items()):
            try:
                k, info, _ = _read_hello(reply, node_id)
            except ValueError as error:
                log.warning("node %d left out: %s", node_id, error)
                self.left_out[node_id] = str(error)
                continue
            if info.digest != self.digest:
                log.warning("node %d (client %d) built a different initial model; left out",
                            node_id, k)
                self.left_out[node_id] = f"client {k}: it built a different initial model"
                continue
            for line in same_data({**self.nodes, k: info}, k):
                log.warning(line)
            old = self.nodes.get(k)
            log.info("client %d %s node %d", k, "moved to" if old else "joined on", node_id)
            if old and info.store != "disk":
                log.warning("client %d: node %d keeps private state in memory (no state-dir): "
                            "the client's router and adaptors start afresh", k, node_id)
            self.nodes[k] = info
            self._clusters[k] = info.cluster

    # -- the transport ---------------------------------------------------------------------------
    def train(
        self, round_: int, clients: Sequence[int], payload: TensorDict
    ) -> dict[int, Trained | str]:
        self.round = round_
        self._rediscover()
        if self.options.secagg:
            return self._secure_train(clients, to_record(payload))
        replies = self._exchange(self._messages(clients, MessageType.TRAIN, to_record(payload)))
        return {k: _read_upload(reply) for k, reply in replies.items()}

    def _secure_train(
        self, clients: Sequence[int], record: ArrayRecord
    ) -> dict[int, Trained | str]:
        """The round under SecAgg+: the server gets the sum of the uploads, never one of them.

        The driver adds uploads in client order, so the sum stands as the first surviving
        client's upload and every other survivor sends zeros of weight zero: the driver's sum,
        each client's train loss (sent in clear, as without SecAgg+) and the bytes counted per
        client are then what they would be without secure aggregation."""
        content = self._messages(clients[:1], MessageType.TRAIN, record)[clients[0]].content
        cast(ConfigRecord, content[CONFIG])["secagg_clip"] = self.options.secagg_clip
        nodes = {k: self.nodes[k].node_id for k in clients}
        outcome = SecureRound(self._exchange, self.options.secagg_clip)(self.round, nodes, content)
        replies: dict[int, Trained | str] = dict(outcome.failed)
        survivors = [k for k in clients if k not in outcome.failed]
        if outcome.total is None:
            return replies
        for i, k in enumerate(survivors):
            loss = float(outcome.metrics[k].get("train_loss", math.nan))
            upload = outcome.total if i == 0 else {
                name: torch.zeros_like(t) for name, t in outcome.total.items()}
            replies[k] = Trained(upload, loss)
        return replies

    def evaluate(
        self, round_: int, clients: Sequence[int], global_state: TensorDict | None
    ) -> dict[int, Evaluated | str]:
        self.round = round_
        record = None if global_state is None else to_record(global_state)
        replies = self._exchange(self._messages(clients, MessageType.EVALUATE, record))
        return {k: _read_evaluation(reply) for k, reply in replies.items()}

    def state_dict(self) -> TensorDict:
        # Private tensors stay on the nodes, under this run's lineage.
        return {LINEAGE_KEY: torch.tensor(list(bytes.fromhex(self.lineage)), dtype=torch.uint8)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Continue the run that wrote `state`: its nodes' private state is under its lineage,
        which only nodes that keep it on disk still have."""
        saved = state.get(LINEAGE_KEY)
        if saved is None or saved.dtype != torch.uint8 or saved.numel() != 16:
            raise ConfigError(
                f"--resume: the checkpoint has no {LINEAGE_KEY!r} (it was not written by the "
                "flower engine of this floral version); delete it to start afresh"
            )
        in_memory = sorted(k for k, info in self.nodes.items() if info.store != "disk")
        if in_memory:
            raise ConfigError(
                f"--resume: the node of client {in_memory[0]} keeps its private state in memory, "
                "which ended with the previous run; start its SuperNode with --node-config "
                "'state-dir=FOLDER' (engine 'flower')"
            )
        self.lineage = bytes(saved.tolist()).hex()

    # -- messages --------------------------------------------------------------------------------
    def _messages(
        self, clients: Sequence[int], kind: str, record: ArrayRecord | None
    ) -> dict[int, Message]:
        content = RecordDict({CONFIG: ConfigRecord(
            {"experiment": self.experiment, "round": self.round, "lineage": self.lineage}
        )})
        if record is not None:
            content[GLOBAL] = record
        return {
            k: Message(content, self.nodes[k].node_id, kind, group_id=str(self.round))
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
        timeout = self.options.round_timeout
        start = time.monotonic()
        deadline, every = start + timeout, min(WAIT_LOG_EVERY, timeout / 4)
        next_line = start + every
        while waiting and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(waiting)):
                replied = waiting.pop(reply.metadata.reply_to_message_id, None)
                if replied is not None:
                    replies[replied] = reply
            if waiting and (now := time.monotonic()) >= next_line:
                self._log_waiting(keys, set(waiting.values()), deadline - now)
                next_line = now + every
            if waiting:
                time.sleep(self.options.poll_interval)
        for key in waiting.values():
            log.warning("round %d: no reply from %s within %.0f s; dropped",
                        self.round, key, timeout)
        took = time.monotonic() - start
        if not waiting and took > timeout / 2:
            log.warning("round %d: the last reply took %.0f s of flower.round-timeout = %.0f s; "
                        "raise it (docs/deploy.md, \"Timeouts\")", self.round, took, timeout)
        return replies

    def _log_waiting(self, keys: Sequence[K], missing: set[K], left: float) -> None:
        late = [str(key) for key in keys if key in missing]
        late = late[:10] + ["..."] * (len(late) > 10)
        log.info("round %d: waiting for %d of %d replies (from %s), %.0f s left of "
                 "flower.round-timeout", self.round, len(missing), len(keys), ", ".join(late),
                 max(0.0, left))


# -- reading replies ------------------------------------------------------------------------------
R = TypeVar("R")
# A record's values as the readers see them. Flower types them as a union that includes lists;
# int() and float() reject those with TypeError, which the readers report as a malformed reply.
Values = Mapping[str, Any]


def _record(reply: Message, name: str, kind: type[R]) -> R:
    if reply.has_error():
        raise ValueError(f"the client failed: {error_reason(reply)}")
    if name not in reply.content:
        raise ValueError(f"the reply has no {name!r} record")
    record = reply.content[name]
    if not isinstance(record, kind):
        raise ValueError(f"{name!r} is not a {kind.__name__}")
    return record


def _read_upload(reply: Message) -> Trained | str:
    try:
        payload = from_record(_record(reply, UPLOAD, ArrayRecord))
        metrics: Values = _record(reply, METRICS, MetricRecord)
        loss = float(metrics.get("train_loss", math.nan))
    except (ValueError, KeyError, TypeError) as error:
        return str(error)
    return Trained(payload, loss)


def _read_evaluation(reply: Message) -> Evaluated | str:
    try:
        sums: Values = _record(reply, EVAL, MetricRecord)
        result = _eval_result(sums) if "count" in sums else None
        if result is not None:
            result.extra.update(_generation_sums(sums))
        router = None
        if "router_choice" in sums:
            router = int(sums["router_choice"]), float(sums["router_confidence"])
    except (ValueError, KeyError, TypeError) as error:
        return str(error)
    return Evaluated(result, router)


def _initial_state(reply: Message | None) -> ServerState | None:
    if reply is None or reply.has_error() or INITIAL not in reply.content:
        return None
    try:
        # A client sends these as ArrayRecords; from_record rejects a malformed array.
        method_state = cast(ArrayRecord, reply.content.get(INITIAL_STATE, ArrayRecord()))
        global_state = cast(ArrayRecord, reply.content[INITIAL])
        return ServerState(from_record(global_state), from_record(method_state))
    except ValueError as error:
        log.warning("unreadable initial state: %s", error)
        return None


def _read_hello(reply: Message, node_id: int) -> tuple[int, ClientInfo, str]:
    info: Values = _record(reply, NODE, ConfigRecord)
    try:
        k, cluster = int(info["partition_id"]), int(info["cluster"])
        store = str(info.get("private_store", "memory"))
        data = str(info.get("data_digest", ""))  # "" from a node of an older floral
        client = ClientInfo(node_id, cluster, str(info["initial_digest"]), store, data)
        return k, client, str(info["kind"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"malformed {NODE!r} record ({error})") from None


def same_data(clients: Mapping[int, ClientInfo], only: int | None = None) -> list[str]:
    """One line per group of clients whose nodes report the same data digest (of those with
    client `only`, if given): one copy of the data on two nodes trains as two clients."""
    groups: dict[str, list[int]] = {}
    for k, info in sorted(clients.items()):
        if info.data_digest:
            groups.setdefault(info.data_digest, []).append(k)
    lines = []
    for digest, ks in groups.items():
        if len(ks) < 2 or only is not None and only not in ks:
            continue
        named = [f"partition-id={k} (node {clients[k].node_id})" for k in ks]
        lines.append(f"{', '.join(named[:-1])} and {named[-1]} report the same data (digest "
                     f"{digest[:12]}): one copy of the data trains as {len(ks)} clients; check "
                     "the nodes' data-path")
    return lines


def _generation_sums(sums: Mapping[str, Any]) -> dict[str, float]:
    """The summable statistics of a client's generated text, checked like the test sums."""
    extra = {key[len(GENERATION_PREFIX):]: float(value) for key, value in sums.items()
             if key.startswith(GENERATION_PREFIX)}
    if any(not math.isfinite(v) or v < 0 for v in extra.values()):
        raise ValueError(f"non-finite or negative generation statistics {extra}")
    return extra


def _eval_result(sums: Mapping[str, float]) -> EvalResult:
    loss_sum, score_sum, count = (sums[key] for key in ("loss_sum", "score_sum", "count"))
    if not (math.isfinite(loss_sum) and math.isfinite(score_sum)) or int(count) < 0:
        raise ValueError(f"non-finite or negative sums {dict(sums)}")
    return EvalResult(float(loss_sum), float(score_sum), int(count))
