"""The client side: one ClientApp that runs any floral method's client step on its node's data.

Every message carries the experiment (TOML) and the round, so a ClientApp started in a fresh
process rebuilds the same task, model and method as the local engine and needs nothing else:
`make_client_app(build)` takes the function that builds a `ClientRuntime` from the experiment
text (floral.flower_app passes the experiment layer's). The client's private tensors never
enter a reply: they live on the node's disk (node config `state-dir`, or the app's own folder
in a simulation; floral.engines.flower.store), so a restarted node or a resumed run keeps
them, or else in `context.state`, for one run.

Node config (`flower-supernode --node-config`): `partition-id` and `num-partitions` choose the
client; `state-dir` names the folder where the node keeps its clients' private state, and
`keep-runs` how many runs' state it keeps there (floral.engines.flower.store), and its built
task, so the next ClientApp process loads it instead of building it (`task-cache=false` turns
this off; floral.engines.flower.task_cache); the
optional `audit-file` names a JSON-lines file where the node records, for every message, the
names, shapes and SHA-256 of the tensors it received and sent, the values of the settings and
metrics it sent, and the digests of its private tensors, so an operator can verify what left
the node.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from math import nan
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

from floral.comm import Codec
from floral.data import FederatedTask
from floral.engines.flower.mods import SECAGG_RECORD, privacy_mod
from floral.engines.flower.node_data import NodeData, data_digest, node_data
from floral.engines.flower.records import (
    CONFIG,
    EVAL,
    GENERATION_PREFIX,
    GLOBAL,
    INITIAL,
    INITIAL_STATE,
    METRICS,
    NODE,
    PRIVATE,
    UPLOAD,
    from_record,
    initial_digest,
    tensors_digest,
    to_record,
)
from floral.engines.flower.secagg import STRUCTURE, layout_of
from floral.engines.flower.store import (
    KEEP_RUNS,
    DiskStore,
    PrivateStore,
    keep_from,
    valid_lineage,
)
from floral.engines.worker import ClientWorker
from floral.errors import ConfigError
from floral.train.state import TensorDict

if TYPE_CHECKING:
    from flwr.app import MetricRecordValues

__all__ = ["ClientNode", "ClientRuntime", "make_client_app", "partition_of"]


@dataclass
class ClientRuntime:
    """Everything a client rebuilds from the experiment: the same on every node."""

    worker: ClientWorker  # the local engine's: placement, threads, local DP, the steps
    down: Codec
    up: Codec
    checkpoint_every: int = 0  # the server's `engine.checkpoint_every`: which versions to keep

    @property
    def task(self) -> FederatedTask:
        return self.worker.task


def partition_of(context: Context, num_clients: int) -> int:
    """This node's client index, from the node config; a mismatch with the task is an error.
    A node with its own data (`data-path`) needs no `num-partitions`."""
    node = context.node_config
    if "data-path" in node and "num-partitions" not in node:
        node = {**node, "num-partitions": num_clients}
    if "partition-id" not in node or "num-partitions" not in node:
        raise ConfigError(
            "node config: needs partition-id and num-partitions "
            "(flower-supernode --node-config 'partition-id=0 num-partitions=N')"
        )
    k, n = node["partition-id"], node["num-partitions"]
    if n != num_clients:
        raise ConfigError(
            f"node config: num-partitions={n} but the experiment has task.num_clients={num_clients}"
        )
    if not isinstance(k, int) or not 0 <= k < n:
        raise ConfigError(f"node config: partition-id must be in [0, {n}), got {k!r}")
    return k


# -- where private state lives ------------------------------------------------------------------
class MemoryStore:
    """The latest private tensors in `context.state`: for one run, while the node lives."""

    kind = "memory"

    def __init__(self, context: Context) -> None:
        self.context = context

    def read(self, k: int, round_: int) -> TensorDict | None:
        return _tensors(self.context.state, PRIVATE) if PRIVATE in self.context.state else None

    def write(self, k: int, round_: int, tensors: Mapping[str, Any], keep: int) -> None:
        self.context.state[PRIVATE] = to_record(tensors)


def store_of(content: RecordDict, context: Context, root: Path | None) -> PrivateStore:
    """The node's store: its `state-dir` (or the app's `root`) on disk, named by the run's
    lineage; context.state when there is neither, or the server sent no lineage."""
    folder = context.node_config.get("state-dir")
    lineage = str(_config(content).get("lineage", ""))
    if folder is None and root is None or not lineage:
        return MemoryStore(context)
    if not valid_lineage(lineage):
        raise ValueError(f"the server sent a malformed lineage {lineage!r}")
    base = Path(str(folder)) if folder is not None else cast(Path, root)
    return DiskStore(base.expanduser(), lineage, keep_runs(context.node_config))


def keep_runs(node_config: Mapping[str, Any]) -> int:
    """Node config `keep-runs`: how many runs' private state the node keeps (0: all)."""
    value = node_config.get("keep-runs", KEEP_RUNS)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"node config: keep-runs must be an integer 0 or more (0 keeps every "
                          f"run's state), got {value!r}")
    return value


def task_cache(node_config: Mapping[str, Any]) -> Path | None:
    """Where the node keeps its built task: `task-cache` under its `state-dir`, unless its
    config says `task-cache=false` (or it has no state-dir)."""
    enabled = node_config.get("task-cache", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"node config: task-cache must be true or false, got {enabled!r}")
    folder = node_config.get("state-dir")
    if folder is None or not enabled:
        return None
    return Path(str(folder)).expanduser() / TASK_CACHE


def store_kind(context: Context, root: Path | None) -> str:
    return "disk" if "state-dir" in context.node_config or root is not None else "memory"


# -- handlers -----------------------------------------------------------------------------------
@dataclass
class Call:
    """One message to handle: for client k of this node, its private state in `store`."""

    runtime: ClientRuntime
    k: int
    content: RecordDict  # the message's
    store: PrivateStore
    kind: str  # what the node's store is when the server asks: "disk" or "memory"
    data: NodeData | None = None  # the node's own data (`data-path`), if it has some


def _hello(call: Call) -> RecordDict:
    runtime, k = call.runtime, call.k
    info = ConfigRecord({
        "partition_id": k,
        "cluster": runtime.task.clients[k].cluster,
        "kind": runtime.task.kind,
        "initial_digest": initial_digest(runtime.worker.initial),
        "private_store": call.kind,
        "data_digest": _data_digest(call),
    })
    content = RecordDict({NODE: info})
    if _config(call.content).get("send_initial", False):
        content[INITIAL] = to_record(runtime.worker.initial.global_state)
        content[INITIAL_STATE] = to_record(runtime.worker.initial.method_state)
    return content


def _data_digest(call: Call) -> str:
    """A digest of the client's data, never the data: of the files a node with `data-path`
    reads (the same files give the same digest on any node, whatever its partition-id, cluster
    or shift), else of its partition's tensors."""
    task, k = call.runtime.task, call.k
    if call.data is not None:
        return data_digest(task.name, call.data)
    client = task.clients[k]
    return tensors_digest({"x_train": client.x_train, "y_train": client.y_train,
                           "x_test": client.x_test, "y_test": client.y_test})


def _train(call: Call) -> RecordDict:
    runtime, k = call.runtime, call.k
    round_ = int(_config(call.content)["round"])
    received = runtime.down.decode(_tensors(call.content, GLOBAL))
    update = runtime.worker.train(round_, received, {k: _private_state(call, round_ - 1)})[k]
    call.store.write(k, round_, update.private, keep_from(round_, runtime.checkpoint_every))
    if SECAGG_RECORD in call.content.config_records:
        return _secure_reply(call, update.upload, float(update.metrics.get("train_loss", nan)))
    metrics = MetricRecord({
        "train_loss": float(update.metrics.get("train_loss", float("nan"))),
        "num_examples": int(update.num_examples),
    })
    return RecordDict({UPLOAD: to_record(runtime.up.encode(update.upload)), METRICS: metrics})


def _secure_reply(call: Call, upload: Mapping[str, torch.Tensor], loss: float) -> RecordDict:
    """The upload as Flower's SecAgg+ mod masks it: a legacy `FitRes` whose parameters are the
    upload's tensors, of weight factor 1 (floral's uploads carry their own weights), with the
    layout the server needs to name the sum. A value beyond the protocol's clipping range
    would be clipped in silence: an error instead."""
    clip = float(_config(call.content)["secagg_clip"])
    tensors = {name: t.detach().float() for name, t in upload.items()}
    largest = max((float(t.abs().max()) for t in tensors.values() if t.numel()), default=0.0)
    if not largest <= clip:
        raise ConfigError(f"flower.secagg-clip: client {call.k}'s upload holds {largest:.6g}, "
                          f"beyond +-{clip:g}; raise flower.secagg-clip")
    fitres = FitRes(
        Status(Code.OK, ""), ndarrays_to_parameters([t.numpy() for t in tensors.values()]), 1,
        {"train_loss": loss, STRUCTURE: layout_of(upload)},
    )
    return fitres_to_recorddict(fitres, keep_input=False)


def _evaluate(call: Call) -> RecordDict:
    """Test sums when the message carries the global tensors; the router's summary always."""
    private = _private_state(call, int(_config(call.content).get("round", 0)))
    received = _tensors(call.content, GLOBAL) if GLOBAL in call.content else None
    evaluated = call.runtime.worker.evaluate(call.k, received, private)
    sums: dict[str, MetricRecordValues] = {}
    if evaluated.result is not None:
        result = evaluated.result
        sums.update(loss_sum=result.loss_sum, score_sum=result.score_sum, count=result.count)
        sums.update({GENERATION_PREFIX + key: value for key, value in result.extra.items()})
    if evaluated.router is not None:
        sums.update(router_choice=evaluated.router[0], router_confidence=evaluated.router[1])
    return RecordDict({EVAL: MetricRecord(sums)})


def _private_state(call: Call, round_: int) -> TensorDict:
    """The client's private tensors after round `round_`: from this node's store, or fresh
    before its first round."""
    stored = call.store.read(call.k, round_)
    return call.runtime.worker.fresh_private(call.k) if stored is None else stored


def _config(content: RecordDict) -> Mapping[str, Any]:
    """The server's config record. Flower types its values as a union that includes lists;
    they are read with int() and str()."""
    return cast(ConfigRecord, content[CONFIG])


def _tensors(records: RecordDict, name: str) -> TensorDict:
    """The tensors of record `name`, which the server (or this node) wrote as an ArrayRecord."""
    return from_record(cast(ArrayRecord, records[name]))


Handler = Callable[[Call], RecordDict]
# How a node builds its runtime: (experiment text, device, its own data or None, the folder
# where it keeps its built task or None).
Build = Callable[[str, str, NodeData | None, Path | None], ClientRuntime]
TASK_CACHE = "task-cache"  # under a node's state-dir


# -- the audit trail ----------------------------------------------------------------------------
def _audit(
    path: Path, kind: str, content: RecordDict, reply: RecordDict, store: PrivateStore, k: int
) -> None:
    round_ = int(_config(content).get("round", 0))
    private = store.read(k, round_) or {}
    entry = {
        "type": kind,
        "round": round_,
        "received": _describe(content),
        "sent": _describe(reply),
        "sent_values": {
            name: dict(record)
            for records in (reply.config_records, reply.metric_records)
            for name, record in records.items()
        },
        "private": {name: tensors_digest({"": t}) for name, t in private.items()},
    }
    with path.open("a") as f:
        f.write(json.dumps(entry) + "\n")


def _describe(content: RecordDict) -> dict[str, dict[str, list]]:
    """Every tensor of a message: record -> name -> [shape, dtype, SHA-256 of its values]."""
    described = {}
    for record_name, record in content.array_records.items():
        tensors = from_record(record)
        described[record_name] = {
            name: [list(t.shape), str(t.dtype), tensors_digest({"": t})]
            for name, t in tensors.items()
        }
    return described


# -- the ClientApp ------------------------------------------------------------------------------
HANDLERS: dict[str, Handler] = {"query": _hello, "train": _train, "evaluate": _evaluate}


class ClientNode:
    """A node's message handling, on message contents: what a ClientApp (or a warm worker,
    floral.flower_client) runs for every message.

    Runtimes are cached, not state: a runtime is a pure function of the experiment text, and
    its scratch model is fully reloaded (global + private tensors) before every use. The cache
    saves rebuilding the task for every message when the process lives on (a simulation's
    workers, a warm worker).
    """

    def __init__(self, build: Build, state_root: Path | None = None) -> None:
        self.build, self.state_root = build, state_root
        self.cache: dict[tuple[str, str, NodeData | None, Path | None], ClientRuntime] = {}

    def runtime_for(
        self, text: str, device: str, data: NodeData | None = None, disk: Path | None = None
    ) -> ClientRuntime:
        key = (text, device, data, disk)
        if key not in self.cache:
            self.cache.clear()  # one experiment per process at a time: keep memory bounded
            self.cache[key] = self.build(text, device, data, disk)
        return self.cache[key]

    def handle(self, kind: str, content: RecordDict, context: Context) -> RecordDict:
        """The reply's content to a message of type `kind` ("query", "train", "evaluate")."""
        handler = HANDLERS.get(kind)
        if handler is None:
            raise ValueError(f"floral's ClientApp answers no {kind!r} message")
        device = str(context.node_config.get("device", ""))
        data = node_data(context.node_config)
        runtime = self.runtime_for(
            str(_config(content)["experiment"]), device, data, task_cache(context.node_config)
        )
        k = partition_of(context, len(runtime.task.clients))
        store = store_of(content, context, self.state_root)
        call = Call(runtime, k, content, store, store_kind(context, self.state_root), data)
        reply = handler(call)
        audit = context.node_config.get("audit-file")
        if audit:
            _audit(Path(str(audit)), kind, content, reply, store, k)
        return reply


def make_client_app(build: Build, state_root: Path | None = None) -> ClientApp:
    """A ClientApp whose runtime is `build(experiment text, device, node data)`, the device
    being the node config's `device` ("" when it names none: the experiment's `engine.device`)
    and the node data its own folder (`data-path`; None: a partition of the experiment's task).

    Private state goes to the node config's `state-dir`, else to `state_root` (a simulation's
    folder for its virtual nodes), else to `context.state`.
    """
    node = ClientNode(build, state_root)

    def serve(msg: Message, context: Context) -> Message:
        content = node.handle(msg.metadata.message_type, msg.content, context)
        return Message(content, reply_to=msg)

    app = ClientApp(mods=[privacy_mod])
    app.query()(serve)
    app.train()(serve)
    app.evaluate()(serve)
    return app
