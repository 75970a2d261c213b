"""Node-local data: each Flower node reads its own client's files from its `data-path` folder.

The nodes' folders hold IDX files the test writes (one client each); the expected numbers come
from the local engine on a task the test assembles itself from the same arrays, normalized
with Fashion-MNIST's published mean and std. An audit hook records every file each node opens:
no node opens another's folder, and no message the server received holds a router tensor. A
node whose data does not fit the run's task is left out with one logged line, and the run goes
on without it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from flwr.app import Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from support.data import client_arrays, expected_task, write_node  # noqa: E402
from support.flower import run_loopback  # noqa: E402

from floral.engines.flower.node_data import NodeData, node_task  # noqa: E402
from floral.errors import ConfigError  # noqa: E402
from floral.experiment import build_engine, resolve_config  # noqa: E402
from floral.flower_app import client_app as floral_client_app  # noqa: E402

NUM_CLIENTS = 3


def experiment(**tables) -> dict:
    data = {
        "name": "node-local",
        "seed": 3,
        "task": {
            "dataset": "fashion-mnist",
            "shift": "none",
            "num_clients": NUM_CLIENTS,
            "num_clusters": 2,
            "data_dir": "/nonexistent/the-server-has-no-data",
        },
        "model": {"name": "mlp", "hidden": [8]},
        "method": {"name": "floral"},
        "train": {
            "rounds": 2,
            "clients_per_round": 1.0,
            "batch_size": 4,
            "lr": 0.05,
            "router_lr": 0.5,
        },
        "engine": {"eval_every": 1},
    }
    for table, values in tables.items():
        data[table] = {**data[table], **values}
    return data


# -- which files each node opens ------------------------------------------------------------------
_OPENED: list[tuple[int, str]] = []  # (node, path) while a test records; nothing otherwise
_NODE: list[int] = []  # the node whose message is being handled


def _record_opens(event: str, args: tuple) -> None:
    if event == "open" and _NODE and isinstance(args[0], (str, Path)):
        _OPENED.append((_NODE[-1], str(Path(args[0]).absolute())))


sys.addaudithook(_record_opens)  # hooks cannot be removed: it records only inside `audited`


@contextmanager
def audited() -> Iterator[list[tuple[int, str]]]:
    _OPENED.clear()
    try:
        yield _OPENED
    finally:
        _NODE.clear()


audited_app = ClientApp()


def _as_node(msg: Message, context: Context) -> Message:
    _NODE.append(int(context.node_config["partition-id"]))
    try:
        return floral_client_app(msg, context)
    finally:
        _NODE.pop()


audited_app.query()(_as_node)
audited_app.train()(_as_node)
audited_app.evaluate()(_as_node)


# -- tests ----------------------------------------------------------------------------------------
def test_each_node_reads_only_its_own_folder_and_matches_the_local_engine(tmp_path):
    clients = [client_arrays(k) for k in range(NUM_CLIENTS)]
    folders = [write_node(tmp_path / f"site{k}", clients[k]) for k in range(NUM_CLIENTS)]
    config = resolve_config(experiment())
    nodes = {k: {"data-path": str(folders[k])} for k in range(NUM_CLIENTS)}
    with audited() as opened:
        summary, grid = run_loopback(config, tmp_path / "flower", audited_app, node_configs=nodes)

    # The local engine on the task assembled by the test: the same numbers.
    engine, _ = build_engine(config, expected_task(clients))
    engine.run()
    expected = engine.evaluate()
    assert "accuracy_cluster1" in expected and expected.keys() <= summary.final.keys()
    for key, value in expected.items():
        assert summary.final[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key

    # Every node opened its own files, and nothing in another node's folder.
    for k, folder in enumerate(folders):
        mine = {path for node, path in opened if node == k}
        assert {str(folder / name) for name in clients[k]} <= mine
        others = [p for p in mine if any(p.startswith(f"{f}/") for f in folders if f != folder)]
        assert not others, (k, others)
    # No router (private to each node) in any message the server received.
    replies = [m for m in grid.traffic if m.metadata.reply_to_message_id]
    assert replies
    for reply in replies:
        for record in reply.content.array_records.values():
            assert not [name for name in record if "router" in name]


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (
            client_arrays(1, side=16),
            "images of shape (1, 16, 16); task.dataset = 'fashion-mnist' needs (1, 28, 28)",
        ),
        (
            client_arrays(1, labels=12),
            "labels in [0, 11]; task.dataset = 'fashion-mnist' has 10 classes",
        ),
        ({k: v for k, v in client_arrays(1).items() if "t10k-labels" not in k},
         "missing t10k-labels-idx1-ubyte[.gz] (the folder holds t10k-images-idx3-ubyte.gz, "),
    ],
    ids=["wrong-shape", "wrong-classes", "missing-file"],
)
def test_a_node_whose_data_does_not_fit_is_left_out_with_one_line(
    tmp_path, caplog, arrays, message
):
    folders = [
        write_node(tmp_path / f"site{k}", client_arrays(k) if k != 1 else arrays)
        for k in range(NUM_CLIENTS)
    ]
    config = resolve_config(experiment())
    nodes = {k: {"data-path": str(folders[k])} for k in range(NUM_CLIENTS)}
    with caplog.at_level(logging.WARNING, logger="flwr.floral"):
        summary, _ = run_loopback(config, tmp_path / "flower", node_configs=nodes)
    left_out = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(left_out) == 1 and message in left_out[0] and str(folders[1]) in left_out[0]
    assert "\n" not in left_out[0] and "ConfigError" in left_out[0]
    assert summary.rounds == 2 and "accuracy" in summary.final  # the others trained on


def test_node_data_errors_name_the_setting(tmp_path):
    config = resolve_config(experiment())
    with pytest.raises(ConfigError, match=r"no such folder \(node config data-path\)"):
        node_task(config.task, 0, NodeData(str(tmp_path / "absent"), 0))
    with pytest.raises(
        ConfigError, match="partition-id=5 but the experiment has task.num_clients=3"
    ):
        node_task(config.task, 0, NodeData(str(tmp_path), 5))
    digits = resolve_config(experiment(task={"dataset": "digits"}))
    with pytest.raises(ConfigError, match="task.dataset 'digits' is not read from a node's"):
        node_task(digits.task, 0, NodeData(str(tmp_path), 0))
    (tmp_path / "a.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    (tmp_path / "b.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    text = resolve_config(
        experiment(
            task={"dataset": "jsonl", "tokenizer": "bytes", "template": "plain"},
            model={"name": "tiny-llama"},
        )
    )
    with pytest.raises(ConfigError, match="holds 2 \\*.jsonl files"):
        node_task(text.task, 0, NodeData(str(tmp_path), 0))
