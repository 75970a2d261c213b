"""The Flower engine's logic on Flower's own messages, records and ClientApp, in one process.

Every registered method must end a run with the local engine's metrics and global tensors; bad
replies are dropped with a log line naming the client and the fault; private tensors never
travel. Ray and a real SuperLink are exercised by test_flower_simulation.py and
test_flower_deployment.py.
"""

from __future__ import annotations

import json
import logging
import re
import time

import pytest

pytest.importorskip("flwr")

import torch  # noqa: E402
from flwr.app import Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from support.flower import (  # noqa: E402
    FAULTS,
    LoopbackGrid,
    faulty_client_app,
    run_loopback,
    tiny_experiment,
)

from floral.engines.flower.options import FlowerOptions  # noqa: E402
from floral.engines.flower.records import (  # noqa: E402
    INITIAL,
    INITIAL_STATE,
    NODE,
    PRIVATE,
    from_record,
    initial_digest,
    tensors_digest,
    to_record,
)
from floral.experiment import build_engine, resolve_config  # noqa: E402
from floral.flower_app import client_app, serve  # noqa: E402
from floral.methods import method_names  # noqa: E402
from floral.methods.base import ServerState  # noqa: E402
from floral.run import run_experiment  # noqa: E402
from floral.train.optim import build_server_optimizer  # noqa: E402


def _globals(path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(path).items() if not k.startswith("private/")}


@pytest.mark.parametrize("method", method_names())
def test_every_method_ends_with_the_local_engines_metrics_and_tensors(tmp_path, method):
    config = resolve_config(tiny_experiment(method))
    local = run_experiment(config, tmp_path / "local")
    flower, _ = run_loopback(config, tmp_path / "flower")
    assert flower.final == local.final  # bitwise: the same operations in the same order
    expected = _globals(tmp_path / "local" / "state.safetensors")
    got = load_file(tmp_path / "flower" / "state.safetensors")
    assert got.pop("flower/lineage").shape == (16,)  # the run's name on the nodes, for resume
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


@pytest.mark.parametrize("method", ["fedavg", "floral"])
def test_the_local_engine_batched_by_default_ends_near_flowers_numbers(tmp_path, method):
    """Batched, the local engine draws what each client draws alone (router noise included),
    and its batched products add up in another order: the same numbers to float rounding."""
    config = resolve_config(tiny_experiment(method), ["engine.batch_clients=auto"])
    local = run_experiment(config, tmp_path / "local")
    flower, _ = run_loopback(config, tmp_path / "flower")
    assert flower.final.keys() == local.final.keys()
    for key, value in flower.final.items():
        if isinstance(value, float) and key not in ("seconds_per_round", "wall_seconds"):
            assert local.final[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize(
    "overrides",
    [
        ["engine.eval_clients=sampled", "train.clients_per_round=0.5"],
        ["method.name=hetlora", "method.ranks=[1, 2, 4, 4]", "method.rank=4"],
        ["train.server_optimizer=adam", "train.server_lr=0.01"],
        ["method.name=floral-em", "method.rank=1", "method.warmup_rank=4",
         "method.warmup_rounds=1"],
        ["method.name=flora", "method.rank_tiers=[1, 2]", "method.rank=2"],
        # DP noise and a DP run's sampling are secret (OS entropy): the clipping is compared.
        ["method.name=fedavg", "train.dp_clip=0.5", "train.clients_per_round=1.0"],
        ["method.name=fedavg", "train.dp_clip=0.5", "train.dp_mode=local",
         "train.clients_per_round=1.0"],
    ],
    ids=["sampled-evaluation", "hetlora-ranks-per-client", "server-adam",
         "floral-em-warmup-restart", "flora-ranks-per-client", "dp-central",
         "dp-local-clipped-on-the-node"],
)
def test_parity_holds_for_sampled_evaluation_ranked_uploads_and_server_adam(tmp_path, overrides):
    config = resolve_config(tiny_experiment("floral"), overrides)
    local = run_experiment(config, tmp_path / "local")
    flower, _ = run_loopback(config, tmp_path / "flower")
    assert flower.final == local.final


def test_bad_replies_are_dropped_with_a_log_line_and_the_round_goes_on(tmp_path, caplog):
    config = resolve_config(
        tiny_experiment("fedavg"), ["train.rounds=1", "train.clients_per_round=1.0"]
    )
    with caplog.at_level(logging.WARNING, logger="flwr.floral"):
        summary, _ = run_loopback(config, tmp_path / "run", faulty_client_app)
    assert summary.rounds == 1 and (tmp_path / "run" / "summary.json").exists()
    dropped = {k: r.getMessage() for r in caplog.records for k in FAULTS
               if f"dropped the reply of client {k}:" in r.getMessage()}
    assert "has shape (3, 3), expected" in dropped[0]
    assert "has NaN or infinite values" in dropped[1]
    assert "missing '" in dropped[2]
    assert not any("client 3:" in r.getMessage() for r in caplog.records)

    # Independently: the new global model is the server update of client 3's upload alone.
    engine, _ = build_engine(config)
    update = engine.method.client_step(engine.slots, engine.local.job(3, engine.global_state, 1))
    expected = engine.method.server_update(
        ServerState(engine.global_state), [update.upload], build_server_optimizer(config.train)
    ).global_state
    state = load_file(tmp_path / "run" / "state.safetensors")
    for name, tensor in expected.items():
        assert torch.equal(state[f"global/{name}"], tensor), name


class LateGrid(LoopbackGrid):
    """Train replies of some nodes come `late` seconds after their message (None: never)."""

    def __init__(self, *args, late: dict[int, float | None], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.late, self.due = late, {}  # client -> delay; message id -> when it may be pulled

    def push_messages(self, messages):
        messages = list(messages)
        ids = list(super().push_messages(messages))
        for message, mid in zip(messages, ids, strict=True):
            client = message.metadata.dst_node_id - 1000
            if message.metadata.message_type == "train" and client in self.late:
                delay = self.late[client]
                self.due[mid] = float("inf") if delay is None else time.monotonic() + delay
        return ids

    def pull_messages(self, message_ids):
        now = time.monotonic()
        return super().pull_messages([i for i in message_ids if self.due.get(i, 0.0) <= now])


def _run_late(tmp_path, late, caplog):
    config = resolve_config(tiny_experiment("fedavg"), [
        "task.num_clients=3", "train.rounds=1", "train.clients_per_round=1.0"])
    grid = LateGrid(client_app, 3, late=late)
    options = FlowerOptions(round_timeout=1.0, node_timeout=1.0, poll_interval=0.01)
    with caplog.at_level(logging.INFO, logger="flwr.floral"):
        summary = serve(grid, config, tmp_path / "run", options)
    return summary, [r.getMessage() for r in caplog.records]


def test_a_round_waiting_on_replies_says_who_is_missing_and_how_long_is_left(tmp_path, caplog):
    # Client 1 answers after 0.6 s, client 2 never; flower.round-timeout = 1 s.
    summary, lines = _run_late(tmp_path, {1: 0.6, 2: None}, caplog)
    assert summary.rounds == 1
    waiting = [line for line in lines if "waiting for" in line]
    pattern = r"round 1: waiting for (\d) of 3 replies \(from ([\d, ]+)\), (\d) s left of " \
              r"flower.round-timeout$"
    seen = [re.match(pattern, line) for line in waiting]
    assert waiting and all(seen), waiting
    assert ("2", "1, 2") in [m.groups()[:2] for m in seen if m]  # both late, at first
    assert ("1", "2") in [m.groups()[:2] for m in seen if m]  # client 1 answered meanwhile
    assert "round 1: no reply from 2 within 1 s; dropped" in lines
    assert not any("no reply from 1" in line for line in lines)


def test_a_round_that_took_most_of_its_timeout_says_so(tmp_path, caplog):
    _, lines = _run_late(tmp_path, {1: 0.7}, caplog)
    took = r'round 1: the last reply took \d s of flower.round-timeout = 1 s; raise it ' \
           r'\(docs/deploy.md, "Timeouts"\)$'
    assert any(re.match(took, line) for line in lines), lines
    assert not any("dropped" in line for line in lines)


def test_routers_stay_on_their_nodes(tmp_path):
    config = resolve_config(tiny_experiment("floral"), ["train.clients_per_round=1.0"])
    _, grid = run_loopback(config, tmp_path / "run")
    routers = {k: from_record(c.state[PRIVATE]) for k, c in enumerate(grid.contexts.values())}
    router_digests = {tensors_digest({"": t}) for r in routers.values() for t in r.values()}
    assert all("floral_router.logits" in r for r in routers.values())
    assert len(router_digests) == len(routers)  # each client trained its own
    for message in grid.traffic:
        for record in message.content.array_records.values():
            for name, tensor in from_record(record).items():
                assert "router" not in name
                assert tensors_digest({"": tensor}) not in router_digests
    saved = load_file(tmp_path / "run" / "state.safetensors")
    assert not any("router" in name for name in saved)


def test_an_audit_file_records_every_message_of_a_node(tmp_path):
    config = resolve_config(tiny_experiment("floral"), ["train.clients_per_round=1.0"])
    audit = tmp_path / "node0.jsonl"
    grid = LoopbackGrid(client_app, config.task.num_clients)
    next(iter(grid.contexts.values())).node_config["audit-file"] = str(audit)
    serve(grid, config, tmp_path / "run", FlowerOptions(node_timeout=1.0, poll_interval=0.001))
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    kinds = [e["type"] for e in entries]
    assert kinds.count("train") == config.train.rounds and "query" in kinds
    trained = [e for e in entries if e["type"] == "train"]
    assert "floral.upload" in trained[0]["sent"] and "floral.global" in trained[0]["received"]
    router_digests = [e["private"]["floral_router.logits"] for e in trained]
    assert router_digests[0] != router_digests[-1]  # the router trained on the node ...
    for entry in entries:  # ... and never travelled
        for record in (*entry["sent"].values(), *entry["received"].values()):
            assert not set(router_digests) & {digest for _, _, digest in record.values()}


odd_first_node = ClientApp()  # client 0 built another initial model, and is asked for it first
odd_first_node.train()(client_app)
odd_first_node.evaluate()(client_app)


@odd_first_node.query()
def _odd_hello(msg: Message, context: Context) -> Message:
    reply = client_app(msg, context)
    if context.node_config["partition-id"] == 0:
        other = {k: torch.zeros_like(v) for k, v in from_record(reply.content[INITIAL]).items()}
        reply.content[INITIAL] = to_record(other)
        own = from_record(reply.content[INITIAL_STATE])
        reply.content[NODE]["initial_digest"] = initial_digest(ServerState(other, own))
    return reply


def test_a_node_with_another_initial_model_is_left_out(tmp_path, caplog):
    config = resolve_config(tiny_experiment("floral"), ["train.clients_per_round=1.0"])
    with caplog.at_level(logging.WARNING, logger="flwr.floral"):
        summary, _ = run_loopback(config, tmp_path / "run", odd_first_node)
    messages = [r.getMessage() for r in caplog.records]
    assert any("client 0 built a different initial model" in m for m in messages)
    assert any("clients [0] have no node; skipped" in m for m in messages)
    assert summary.rounds == config.train.rounds
    # The initial evaluation used the tensors the others built: cluster 1 (without client 0)
    # scores at round 0 as on the local engine.
    local = run_experiment(config, tmp_path / "local")
    assert local.history[0]["mse_cluster1"] == summary.history[0]["mse_cluster1"]


def test_records_keep_every_tensor_shape_a_scalar_included():
    tensors = {"scalar": torch.tensor(3.0), "vector": torch.arange(4.0),
               "half": torch.ones(2, 3, dtype=torch.bfloat16)}
    back = from_record(to_record(tensors))
    for name, tensor in tensors.items():
        assert back[name].shape == tensor.shape and torch.equal(back[name], tensor), name
