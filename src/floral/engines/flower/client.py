"""The client side: one ClientApp that runs any floral method's client step on its node's data.

Every message carries the experiment (TOML) and the round, so a ClientApp started in a fresh
process rebuilds the same task, model and method as the local engine (`build_setup`) and needs
nothing else. The client's private tensors live in `context.state` and never enter a reply.

Node config (`flower-supernode --node-config`): `partition-id` and `num-partitions` choose the
client; the optional `audit-file` names a JSON-lines file where the node records, for every
message, the names, shapes and SHA-256 of the tensors it received and sent, the values of the
settings and metrics it sent, and the digests of its private tensors, so an operator can verify
what left the node.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from floral.comm import Codec, build_codec
from floral.config import tomllib
from floral.data import ClientData, FederatedTask
from floral.engines.flower.checks import tensors_digest
from floral.engines.flower.records import (
    CONFIG,
    EVAL,
    GLOBAL,
    INITIAL,
    METRICS,
    NODE,
    PRIVATE,
    UPLOAD,
    from_record,
    to_record,
)
from floral.engines.local import client_seed
from floral.errors import ConfigError
from floral.experiment import ExperimentConfig, build_setup, resolve_config
from floral.methods.base import Method, split_roles
from floral.train.evaluate import evaluate
from floral.train.state import StateSlots, TensorDict

__all__ = ["ClientRuntime", "client_app", "experiment_text", "runtime_for"]


@dataclass
class ClientRuntime:
    """Everything a client rebuilds from the experiment: the same on every node."""

    config: ExperimentConfig
    method: Method
    task: FederatedTask
    slots: StateSlots
    initial_global: TensorDict
    initial_private: TensorDict
    down: Codec
    up: Codec

    @classmethod
    def build(cls, config: ExperimentConfig) -> ClientRuntime:
        method, task, model = build_setup(config)
        slots = StateSlots(model)
        global_names, private_names = split_roles(method.roles(model))
        return cls(
            config, method, task, slots, slots.snapshot(global_names),
            slots.snapshot(private_names),
            build_codec(config.comm.download, "comm.download"),
            build_codec(config.comm.upload, "comm.upload"),
        )


def experiment_text(config: ExperimentConfig) -> str:
    """The experiment as the server sends it: the resolved config, as TOML."""
    return tomli_w.dumps(config.to_dict())


# A cache, not state: a runtime is a pure function of the experiment text, and its scratch model
# is fully reloaded (global + private tensors) before every use. It saves rebuilding the task for
# every message when Flower reuses the process (simulation actors).
_RUNTIMES: dict[str, ClientRuntime] = {}


def runtime_for(text: str) -> ClientRuntime:
    runtime = _RUNTIMES.get(text)
    if runtime is None:
        runtime = ClientRuntime.build(resolve_config(tomllib.loads(text)))
        _RUNTIMES.clear()  # one experiment per process at a time: keep memory bounded
        _RUNTIMES[text] = runtime
    return runtime


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
    data = runtime.task.clients[k]
    info = ConfigRecord({
        "partition_id": k,
        "cluster": data.cluster,
        "kind": runtime.task.kind,
        "initial_digest": tensors_digest(runtime.initial_global),
    })
    content = RecordDict({NODE: info})
    if msg.content[CONFIG].get("send_initial", False):
        content[INITIAL] = to_record(runtime.initial_global)
    return content


def _train(runtime: ClientRuntime, k: int, msg: Message, context: Context) -> RecordDict:
    config = runtime.config
    round_ = int(msg.content[CONFIG]["round"])
    received = runtime.down.decode(from_record(msg.content[GLOBAL]))
    update = runtime.method.client_step(
        runtime.slots,
        received,
        _private_state(runtime, k, context),
        runtime.task.clients[k],
        config.train,
        runtime.task.kind,
        client_seed(config.seed, round_, k),
    )
    context.state[PRIVATE] = to_record(update.private)
    metrics = MetricRecord({
        "train_loss": float(update.metrics.get("train_loss", float("nan"))),
        "num_examples": int(update.num_examples),
    })
    return RecordDict({UPLOAD: to_record(runtime.up.encode(update.upload)), METRICS: metrics})


def _evaluate(runtime: ClientRuntime, k: int, msg: Message, context: Context) -> RecordDict:
    """Test sums when the message carries the global tensors; the router's summary always."""
    private = _private_state(runtime, k, context)
    sums: dict[str, int | float] = {}
    if GLOBAL in msg.content:
        data: ClientData = runtime.task.clients[k]
        runtime.slots.load(from_record(msg.content[GLOBAL]))
        runtime.slots.load(private)
        result = evaluate(
            runtime.slots.model, data.x_test, data.y_test, runtime.task.kind,
            runtime.config.train.eval_batch_size,
        )
        sums.update(loss_sum=result.loss_sum, score_sum=result.score_sum, count=result.count)
    weights = runtime.method.router_weights(private)
    if weights is not None:
        # Cluster recovery needs which adaptor leads and by how much, never the router itself.
        sums.update(router_choice=int(weights.argmax()), router_confidence=float(weights.max()))
    return RecordDict({EVAL: MetricRecord(sums)})


def _private_state(runtime: ClientRuntime, k: int, context: Context) -> TensorDict:
    """The client's private tensors: from this node's state, or fresh before its first round."""
    if PRIVATE in context.state:
        return from_record(context.state[PRIVATE])
    return runtime.method.init_private(runtime.initial_private, runtime.task.clients[k])


Handler = Callable[[ClientRuntime, int, Message, Context], RecordDict]


def _serve(handler: Handler, msg: Message, context: Context) -> Message:
    runtime = runtime_for(str(msg.content[CONFIG]["experiment"]))
    k = partition_of(context, len(runtime.task.clients))
    reply = Message(handler(runtime, k, msg, context), reply_to=msg)
    audit = context.node_config.get("audit-file")
    if audit:
        _audit(Path(str(audit)), msg, reply, context)
    return reply


# -- the audit trail ----------------------------------------------------------------------------
def _audit(path: Path, msg: Message, reply: Message, context: Context) -> None:
    private = from_record(context.state[PRIVATE]) if PRIVATE in context.state else {}
    entry = {
        "type": msg.metadata.message_type,
        "round": int(msg.content[CONFIG].get("round", 0)),
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
client_app = ClientApp()


@client_app.query()
def _query(msg: Message, context: Context) -> Message:
    return _serve(_hello, msg, context)


@client_app.train()
def _train_message(msg: Message, context: Context) -> Message:
    return _serve(_train, msg, context)


@client_app.evaluate()
def _evaluate_message(msg: Message, context: Context) -> Message:
    return _serve(_evaluate, msg, context)
