"""The client side: one ClientApp that runs any floral method's client step on its node's data.

Every message carries the experiment (TOML) and the round, so a ClientApp started in a fresh
process rebuilds the same task, model and method as the local engine and needs nothing else:
`make_client_app(build)` takes the function that builds a `ClientRuntime` from the experiment
text (floral.flower_app passes the experiment layer's). The client's private tensors live in
`context.state` and never enter a reply.

Node config (`flower-supernode --node-config`): `partition-id` and `num-partitions` choose the
client; the optional `audit-file` names a JSON-lines file where the node records, for every
message, the names, shapes and SHA-256 of the tensors it received and sent, the values of the
settings and metrics it sent, and the digests of its private tensors, so an operator can verify
what left the node.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from floral.comm import Codec
from floral.data import FederatedTask
from floral.engines.driver import client_seed, router_summary
from floral.engines.flower.records import (
    CONFIG,
    EVAL,
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
from floral.errors import ConfigError
from floral.methods.base import ClientJob, Method, ServerState
from floral.train.device import Placement, to_device
from floral.train.loop import TrainConfig
from floral.train.objective import Objective
from floral.train.state import StateSlots, TensorDict

if TYPE_CHECKING:
    from flwr.app import MetricRecordValues

__all__ = ["ClientRuntime", "make_client_app", "partition_of"]


@dataclass
class ClientRuntime:
    """Everything a client rebuilds from the experiment: the same on every node."""

    method: Method
    task: FederatedTask
    slots: StateSlots
    initial: ServerState  # what the server starts from, sent when it asks
    initial_private: TensorDict
    train: TrainConfig
    objective: Objective
    seed: int
    down: Codec
    up: Codec
    placement: Placement = Placement()  # this node's device (node config `device`), precision


def partition_of(context: Context, num_clients: int) -> int:
    """This node's client index, from the node config; a mismatch with the task is an error."""
    node = context.node_config
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


# -- handlers -----------------------------------------------------------------------------------
def _hello(runtime: ClientRuntime, k: int, msg: Message, context: Context) -> RecordDict:
    info = ConfigRecord({
        "partition_id": k,
        "cluster": runtime.task.clients[k].cluster,
        "kind": runtime.task.kind,
        "initial_digest": initial_digest(runtime.initial),
    })
    content = RecordDict({NODE: info})
    if _config(msg).get("send_initial", False):
        content[INITIAL] = to_record(runtime.initial.global_state)
        content[INITIAL_STATE] = to_record(runtime.initial.method_state)
    return content


def _train(runtime: ClientRuntime, k: int, msg: Message, context: Context) -> RecordDict:
    round_ = int(_config(msg)["round"])
    device = runtime.placement.device
    job = ClientJob(
        to_device(runtime.down.decode(_tensors(msg.content, GLOBAL)), device),
        to_device(_private_state(runtime, k, context), device),
        runtime.task.clients[k],
        runtime.train,
        runtime.objective,
        client_seed(runtime.seed, round_, k),
        round_,
        runtime.placement,
    )
    update = runtime.method.client_step(runtime.slots, job).on_cpu()
    context.state[PRIVATE] = to_record(update.private)
    metrics = MetricRecord({
        "train_loss": float(update.metrics.get("train_loss", float("nan"))),
        "num_examples": int(update.num_examples),
    })
    return RecordDict({UPLOAD: to_record(runtime.up.encode(update.upload)), METRICS: metrics})


def _evaluate(runtime: ClientRuntime, k: int, msg: Message, context: Context) -> RecordDict:
    """Test sums when the message carries the global tensors; the router's summary always."""
    private = _private_state(runtime, k, context)
    sums: dict[str, MetricRecordValues] = {}
    if GLOBAL in msg.content:
        data = runtime.task.clients[k]
        runtime.slots.load(_tensors(msg.content, GLOBAL))
        runtime.slots.load(private)
        result = runtime.objective.evaluate(
            runtime.slots.model, data.x_test, data.y_test, runtime.train.eval_batch_size,
            runtime.placement,
        )
        sums.update(loss_sum=result.loss_sum, score_sum=result.score_sum, count=result.count)
    router = router_summary(runtime.method, private)
    if router is not None:
        sums.update(router_choice=router[0], router_confidence=router[1])
    return RecordDict({EVAL: MetricRecord(sums)})


def _private_state(runtime: ClientRuntime, k: int, context: Context) -> TensorDict:
    """The client's private tensors: from this node's state, or fresh before its first round."""
    if PRIVATE in context.state:
        return _tensors(context.state, PRIVATE)
    return runtime.method.init_private(runtime.initial_private, runtime.task.clients[k])


def _config(msg: Message) -> Mapping[str, Any]:
    """The server's config record. Flower types its values as a union that includes lists;
    they are read with int() and str()."""
    return cast(ConfigRecord, msg.content[CONFIG])


def _tensors(records: RecordDict, name: str) -> TensorDict:
    """The tensors of record `name`, which the server (or this node) wrote as an ArrayRecord."""
    return from_record(cast(ArrayRecord, records[name]))


Handler = Callable[[ClientRuntime, int, Message, Context], RecordDict]


# -- the audit trail ----------------------------------------------------------------------------
def _audit(path: Path, msg: Message, reply: Message, context: Context) -> None:
    private = _tensors(context.state, PRIVATE) if PRIVATE in context.state else {}
    entry = {
        "type": msg.metadata.message_type,
        "round": int(_config(msg).get("round", 0)),
        "received": _describe(msg.content),
        "sent": _describe(reply.content),
        "sent_values": {
            name: dict(record)
            for records in (reply.content.config_records, reply.content.metric_records)
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
def make_client_app(build: Callable[[str, str], ClientRuntime]) -> ClientApp:
    """A ClientApp whose runtime is `build(experiment text, device)`, the device being the
    node config's `device` ("" when it names none: the experiment's `engine.device`).

    Runtimes are cached, not state: a runtime is a pure function of the experiment text, and
    its scratch model is fully reloaded (global + private tensors) before every use. The cache
    saves rebuilding the task for every message when Flower reuses the process (simulation).
    """
    cache: dict[tuple[str, str], ClientRuntime] = {}

    def runtime_for(text: str, device: str) -> ClientRuntime:
        if (text, device) not in cache:
            cache.clear()  # one experiment per process at a time: keep memory bounded
            cache[text, device] = build(text, device)
        return cache[text, device]

    def serve(handler: Handler, msg: Message, context: Context) -> Message:
        device = str(context.node_config.get("device", ""))
        runtime = runtime_for(str(_config(msg)["experiment"]), device)
        k = partition_of(context, len(runtime.task.clients))
        reply = Message(handler(runtime, k, msg, context), reply_to=msg)
        audit = context.node_config.get("audit-file")
        if audit:
            _audit(Path(str(audit)), msg, reply, context)
        return reply

    app = ClientApp()

    @app.query()
    def _query(msg: Message, context: Context) -> Message:
        return serve(_hello, msg, context)

    @app.train()
    def _train_message(msg: Message, context: Context) -> Message:
        return serve(_train, msg, context)

    @app.evaluate()
    def _evaluate_message(msg: Message, context: Context) -> Message:
        return serve(_evaluate, msg, context)

    return app
