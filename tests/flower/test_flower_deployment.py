"""A real deployment: a SuperLink and two SuperNodes on 127.0.0.1, and `flwr run` of the app.

One round of FLoRAL on synthetic-mlp (each round costs two ClientApp processes per node,
~7 s; the harness is tests/support/federation.py). Checks the results folder, that its numbers
are the local engine's for the same experiment, and, from each node's audit file, that its
router trained there (it is the local engine's router of that client) and never appeared in
any message, in either direction. The slow tests restart a SuperNode and resume the run, and
kill a SuperNode (SIGKILL) to see every process started for it end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("flwr")
if shutil.which("flower-superlink") is None or shutil.which("flower-supernode") is None:
    pytest.skip("flower-superlink / flower-supernode not on PATH", allow_module_level=True)

from safetensors.torch import load_file  # noqa: E402
from support.federation import Federation  # noqa: E402
from support.flower import APP, app_experiment  # noqa: E402

from floral.engines.flower.records import tensors_digest  # noqa: E402
from floral.run import run_experiment  # noqa: E402


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    # Node 1 hands its messages to a warm worker (floral.flower_client), node 0 does not.
    with Federation(tmp_path, num_nodes=2, warm_nodes=frozenset({1})) as running:
        yield running


def test_floral_runs_on_a_superlink_with_two_supernodes(federation, tmp_path):
    out = tmp_path / "results"
    run_config = (
        f'output.dir="{out}" train.rounds=1 engine.eval_every=1 '
        "flower.round-timeout=300.0 flower.node-timeout=120.0"
    )
    done = federation.run(APP, run_config)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    rows = (out / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["0", "1"]

    # The same experiment, from the app's run config, on the local engine: the same numbers
    # (one client at a time, as each node trains its own: bit for bit).
    experiment = app_experiment(run_config)
    experiment.engine.batch_clients = 0
    local = run_experiment(experiment, tmp_path / "local")
    assert summary["method"] == "floral" and summary["rounds"] == 1
    assert summary["final"] == pytest.approx(local.final, rel=1e-6)
    assert summary["final"]["mse"] < float(rows[1].split(",")[1])  # better than round 0

    # Each router trained on its node, into the local engine's router of that client, and
    # never travelled, in either direction.
    local_state = load_file(tmp_path / "local" / "state.safetensors")
    routers = []
    for k, audit in enumerate(federation.audits):
        entries = [json.loads(line) for line in audit.read_text().splitlines()]
        trained = [e["private"]["floral_router.logits"] for e in entries if e["type"] == "train"]
        local_router = local_state[f"private/{k}/floral_router.logits"]
        assert trained == [tensors_digest({"": local_router})]
        routers += trained
        for entry in entries:
            for record in (*entry["sent"].values(), *entry["received"].values()):
                assert not any("router" in name for name in record)
                assert not {digest for _, _, digest in record.values()} & set(trained)
    assert len(set(routers)) == len(routers)  # two nodes, two routers of their own
    assert not any("router" in name for name in load_file(out / "state.safetensors"))

    # Node 1's messages all went to one warm worker, which stops with its SuperNode.
    log = (federation.state_dir(1) / "worker.log").read_text()
    workers = [int(pid) for pid in re.findall(r"warm worker (\d+) of SuperNode", log)]
    assert len(workers) == 1 and not (federation.state_dir(0) / "worker.log").exists()
    federation.stop_node(1)
    deadline = time.monotonic() + 15
    while _running(workers[0]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _running(workers[0])


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# A second deployed run (~40 s): in the slow tests.
@pytest.mark.slow
def test_a_supernode_restarted_between_rounds_keeps_its_private_state(federation, tmp_path):
    out = tmp_path / "results"
    timeouts = "flower.round-timeout=300.0 flower.node-timeout=120.0"
    first = f'output.dir="{out}" train.rounds=1 engine.checkpoint_every=1 {timeouts}'
    done = federation.run(APP, first)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((out / "checkpoint" / "manifest.json").read_text())["round"] == 1

    # Node 0 goes down and comes back, a new process with a new node id but the same folder;
    # the server goes down too (its run ended) and resumes from its checkpoint.
    federation.stop_node(0)
    federation.start_node(0)
    second = first.replace("train.rounds=1", "train.rounds=2")
    done = federation.run(APP, second + " flower.resume=true")
    assert done.returncode == 0, done.stdout + done.stderr

    # The same two rounds on the local engine, uninterrupted: the same numbers.
    local = run_experiment(app_experiment(second), tmp_path / "local")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["final"] == pytest.approx(local.final, rel=1e-6)
    # Round 2 on the restarted node started from its router of round 1, read from its disk:
    # what it trained is the local engine's router of client 0 after round 2.
    entries = [json.loads(line) for line in federation.audits[0].read_text().splitlines()]
    trained = [e["private"]["floral_router.logits"] for e in entries if e["type"] == "train"]
    local_state = load_file(tmp_path / "local" / "state.safetensors")
    local_router = local_state["private/0/floral_router.logits"]
    assert trained[-1] == tensors_digest({"": local_router}) and len(trained) == 2


def _group(pgid: int) -> list[str]:
    """The running (not zombie) processes of a process group: `pid state command`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            found.append(f"{stat.parent.name} {fields[0]} {text[: text.rindex(')') + 1]}")
    return found


def _wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.2)
    return condition()


# A deployed round and a kill (~30 s): in the slow tests. Linux only (reads /proc).
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_processes_started_for_a_supernode_end_when_it_is_killed(federation, tmp_path):
    done = federation.run(APP, f'output.dir="{tmp_path / "results"}" train.rounds=1 '
                          "flower.round-timeout=300.0 flower.node-timeout=120.0")
    assert done.returncode == 0, done.stdout + done.stderr
    log = (federation.state_dir(1) / "worker.log").read_text()
    worker = int(re.findall(r"warm worker (\d+) of SuperNode", log)[0])
    assert f"of SuperNode {federation.nodes[1].pid} " in log  # it watches the SuperNode itself
    assert _running(worker)

    # SIGKILL, and the SuperNode's parent (this test) does not reap it yet: a zombie, as under
    # an init that never reaps. Flower's SuperExec still counts it alive; floral's worker not.
    node = federation.nodes.pop(1)
    node.send_signal(signal.SIGKILL)
    worker_runs = lambda: any(p.split()[0] == str(worker) for p in _group(node.pid))  # noqa: E731
    assert _wait_until(lambda: not worker_runs(), 15), _group(node.pid)
    assert "is gone: stopping" in (federation.state_dir(1) / "worker.log").read_text()
    node.wait()  # reaped: Flower's own processes of the node end too
    assert _wait_until(lambda: not _group(node.pid), 20), _group(node.pid)
