"""The thin ClientApp and its warm worker (floral.flower_client).

Messages go through Flower's `Message`s and the thin ClientApp in this process, which hands
them to one worker process per node over its Unix socket; the run must end with exactly the
local engine's numbers, each node must have started one worker for all its messages, and the
workers stop, also when their SuperNode is killed (SIGKILL) in the middle of a message. The thin
ClientApp imports no PyTorch. The real SuperNodes are in test_flower_deployment.py.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from flwr.app import Context, Message, RecordDict  # noqa: E402
from support.flower import LoopbackGrid, tiny_experiment  # noqa: E402

from floral.engines.flower.options import FlowerOptions  # noqa: E402
from floral.errors import ConfigError  # noqa: E402
from floral.experiment import resolve_config  # noqa: E402
from floral.flower_app import serve  # noqa: E402
from floral.flower_client import _serve, client_app  # noqa: E402
from floral.run import run_experiment  # noqa: E402


def _workers(folders) -> list[int]:
    pids = []
    for folder in folders:
        log = (folder / "worker.log").read_text()
        pids += [int(p) for p in re.findall(r"warm worker (\d+) of SuperNode", log)]
    return pids


def _gone(pid: int) -> bool:
    try:  # a worker started from this process is its child: reap it
        if os.waitpid(pid, os.WNOHANG)[0]:
            return True
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_warm_workers_answer_every_message_with_the_local_engines_numbers(tmp_path):
    config = resolve_config(tiny_experiment("floral"), ["task.num_clients=2",
                                                        "train.clients_per_round=1.0"])
    local = run_experiment(config, tmp_path / "local")
    grid = LoopbackGrid(client_app, 2, tmp_path / "nodes")
    for context in grid.contexts.values():
        context.node_config.update({"warm-worker": True, "worker-idle": 60.0})
    folders = [tmp_path / "nodes" / f"node{k}" for k in range(2)]
    try:
        options = FlowerOptions(round_timeout=300.0, node_timeout=1.0, poll_interval=0.001)
        summary = serve(grid, config, tmp_path / "flower", options)
        assert summary.final == local.final
        pids = _workers(folders)
        assert len(pids) == 2  # one worker per node, for all its messages
        assert all(not _gone(pid) for pid in pids)
        assert all(oct((f / "worker.sock").stat().st_mode)[-3:] == "600" for f in folders)
    finally:
        for pid in _workers([f for f in folders if (f / "worker.log").exists()]):
            if not _gone(pid):
                os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(pid) for pid in pids)


def test_warm_worker_needs_a_state_dir():
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                      node_config={"partition-id": 0, "num-partitions": 2, "warm-worker": True})
    grid = LoopbackGrid(client_app, 1)  # sets the running task Flower's messages need
    message = Message(RecordDict(), next(iter(grid.contexts)), "query")
    with pytest.raises(ConfigError, match="warm-worker=true needs state-dir"):
        _serve(message, context)


SRC = Path(__file__).resolve().parents[1] / "src"
# What the ClientApp process of a warm node does, in a fresh Python: import the app, name its
# code, carry a message's records; none of it may load PyTorch.
THIN = """
import sys
import floral.flower_client as thin
from flwr.app import ConfigRecord, RecordDict

thin.code_fingerprint()
thin.supernode_pid()
content = RecordDict({"config": ConfigRecord({"experiment": "x", "round": 1})})
assert thin._from_bytes(thin._to_bytes(content))["config"]["round"] == 1
heavy = sorted(name for name in ("torch", "floral.train", "floral.engines.driver")
               if name in sys.modules)
print("loaded:", *heavy)
sys.exit(1 if heavy else 0)
"""


def test_the_thin_client_app_imports_no_torch():
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, "-c", THIN], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "torch" not in done.stdout.split()


def _start_worker(folder: Path, parent: int) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    with (folder / "worker.log").open("w") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "floral.flower_client", "--state-dir", str(folder),
             "--parent", str(parent), "--idle", "300"],
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 120
    while not (folder / "worker.sock").exists():
        assert worker.poll() is None, (folder / "worker.log").read_text()
        assert time.monotonic() < deadline, "the worker does not listen"
        time.sleep(0.05)
    return worker


@pytest.mark.parametrize("case", ["zombie", "busy"])
def test_a_warm_worker_exits_when_its_supernode_is_killed(tmp_path, case):
    """SIGKILL of the SuperNode ends its worker within seconds: a SuperNode not yet reaped (a
    zombie, as under a container's init that never reaps), or one reaped while the worker is
    in the middle of a message (here: reading one that never ends)."""
    supernode = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    worker, client = None, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        worker = _start_worker(tmp_path / "node", supernode.pid)
        if case == "busy":
            client.connect(str(tmp_path / "node" / "worker.sock"))
            client.sendall((1000).to_bytes(8, "big") + b"{")  # a header that never ends
        supernode.kill()
        if case == "busy":
            supernode.wait()
        deadline = time.monotonic() + 15
        while worker.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert worker.poll() is not None, "the worker outlived its SuperNode"
        log = (tmp_path / "node" / "worker.log").read_text()
        assert f"SuperNode {supernode.pid} is gone" in log
        assert not (tmp_path / "node" / "worker.sock").exists()
    finally:
        client.close()
        supernode.kill()
        supernode.wait()
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.wait()
