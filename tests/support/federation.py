"""A real Flower federation on 127.0.0.1: a SuperLink and SuperNodes, each its own process group.

Shared by tests/test_flower_deployment.py and benchmarks/deploy_round.py. Every process leads
its own session, so stopping it stops the ServerApp / ClientApp processes it started; `FLWR_HOME`
is the federation's own folder, so Flower's files (connections, installed apps) stay there.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["START_TIMEOUT", "Federation", "free_port", "stop"]

START_TIMEOUT = 120.0  # seconds for a process to listen
CONNECTION = "floral-test"


def free_port() -> int:
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
    with log.open("w") as out:
        return subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(process: subprocess.Popen) -> None:
    """Stop a process and its group: SIGTERM, then SIGKILL."""
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


@dataclass
class Federation:
    """`with Federation(folder, num_nodes) as federation: federation.run(app, run_config)`.

    Node k holds client k (`partition-id`), keeps its private state in `folder/node<k>-state`
    and records every message in `audits[k]`."""

    folder: Path
    num_nodes: int = 2
    warm_nodes: frozenset[int] = frozenset()  # nodes whose messages go to a warm worker
    node_configs: dict[int, str] = field(default_factory=dict)  # more node config, per node
    node_envs: dict[int, dict[str, str]] = field(default_factory=dict)  # more environment
    env: dict[str, str] = field(default_factory=dict)
    link: int = 0
    nodes: dict[int, subprocess.Popen] = field(default_factory=dict)
    superlink: subprocess.Popen | None = None

    @property
    def audits(self) -> list[Path]:
        return [self.folder / f"node{k}-audit.jsonl" for k in range(self.num_nodes)]

    def __enter__(self) -> Federation:
        home = self.folder / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_UPDATE_CHECK": "1"}
        self.link = free_port()
        try:
            log = self.folder / "superlink.log"
            self.superlink = _start(
                ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port",
                 str(self.link), "--disable-runtime-dependency-installation"], self.env, log,
            )
            _wait_for_port(self.link, self.superlink, log)
            for k in range(self.num_nodes):
                self.start_node(k)
            (home / "config.toml").write_text(
                f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                f'address = "127.0.0.1:{self.link}"\ninsecure = true\n'
            )
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self.nodes.values():
            stop(process)
        self.nodes.clear()
        if self.superlink is not None:
            stop(self.superlink)
            self.superlink = None

    def start_node(self, k: int) -> None:
        """SuperNode k, holding client k, with its audit file and its own state folder."""
        port, log = free_port(), self.folder / f"supernode{k}.log"
        node_config = (f'partition-id={k} num-partitions={self.num_nodes} '
                       f'audit-file="{self.audits[k]}" state-dir="{self.state_dir(k)}"')
        if k in self.warm_nodes:
            node_config += " warm-worker=true"
        if k in self.node_configs:
            node_config += " " + self.node_configs[k]
        self.nodes[k] = _start(
            ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.link}",
             "--host", "127.0.0.1", "--port", str(port), "--node-config", node_config],
            {**self.env, **self.node_envs.get(k, {})}, log,
        )
        _wait_for_port(port, self.nodes[k], log)

    def state_dir(self, k: int) -> Path:
        return self.folder / f"node{k}-state"

    def stop_node(self, k: int) -> None:
        stop(self.nodes.pop(k))

    def run(
        self, app: Path, run_config: str, timeout: float = 900.0
    ) -> subprocess.CompletedProcess:
        """`flwr run APP --run-config RUN_CONFIG --stream`, to the end."""
        return subprocess.run(
            ["flwr", "run", str(app), CONNECTION, "--run-config", run_config, "--stream"],
            env=self.env, capture_output=True, text=True, timeout=timeout,
        )
