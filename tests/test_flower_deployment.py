"""A real deployment: a SuperLink and two SuperNodes on 127.0.0.1, and `flwr run` of the app.

One round of FLoRAL on synthetic-mlp (each round costs two ClientApp processes per node,
~7 s). Checks the results folder, that its numbers are the local engine's for the same
experiment, and, from each node's audit file, that its router trained there (it is the local
engine's router of that client) and never appeared in any message, in either direction.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("flwr")
if shutil.which("flower-superlink") is None or shutil.which("flower-supernode") is None:
    pytest.skip("flower-superlink / flower-supernode not on PATH", allow_module_level=True)

from flwr.common.config import flatten_dict, parse_config_args  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from floral.config import tomllib  # noqa: E402
from floral.engines.flower import experiment_from_run_config  # noqa: E402
from floral.engines.flower.records import tensors_digest  # noqa: E402
from floral.experiment import resolve_config  # noqa: E402
from floral.run import run_experiment  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "examples" / "flower-app"
START_TIMEOUT = 120.0  # seconds for a process to listen
RUN_TIMEOUT = 900.0  # seconds for the whole `flwr run`


@dataclass
class Federation:
    env: dict[str, str]
    connection: str
    audits: list[Path]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited early:\n{log.read_text()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {START_TIMEOUT} s")


def _start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    # A session of its own, so the whole process group (ServerApp / ClientApp children) stops.
    with log.open("w") as out:
        return subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1"}
    processes: list[subprocess.Popen] = []
    try:
        link = _free_port()
        log = tmp_path / "superlink.log"
        processes.append(_start(
            ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link),
             "--disable-runtime-dependency-installation"], env, log,
        ))
        _wait_for_port(link, processes[-1], log)
        audits = [tmp_path / f"node{k}-audit.jsonl" for k in range(2)]
        for k, audit in enumerate(audits):
            port, log = _free_port(), tmp_path / f"supernode{k}.log"
            node_config = f'partition-id={k} num-partitions=2 audit-file="{audit}"'
            processes.append(_start(
                ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                 "--host", "127.0.0.1", "--port", str(port), "--node-config", node_config],
                env, log,
            ))
            _wait_for_port(port, processes[-1], log)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "floral-test"\n\n[superlink.floral-test]\n'
            f'address = "127.0.0.1:{link}"\ninsecure = true\n'
        )
        yield Federation(env, "floral-test", audits)
    finally:
        for process in reversed(processes):
            _stop(process)


def test_floral_runs_on_a_superlink_with_two_supernodes(federation, tmp_path):
    out = tmp_path / "results"
    run_config = (
        f'output.dir="{out}" train.rounds=1 engine.eval_every=1 '
        "flower.round-timeout=300.0 flower.node-timeout=120.0"
    )
    done = subprocess.run(
        ["flwr", "run", str(APP), federation.connection, "--run-config", run_config, "--stream"],
        env=federation.env, capture_output=True, text=True, timeout=RUN_TIMEOUT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    rows = (out / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["0", "1"]

    # The same experiment, from the app's run config, on the local engine: the same numbers.
    local = run_experiment(_app_experiment(run_config), tmp_path / "local")
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


def _app_experiment(run_config: str):
    app = tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    flat = {**flatten_dict(app), **parse_config_args([run_config])}
    data, overrides = experiment_from_run_config(flat)
    return resolve_config(data, overrides)
