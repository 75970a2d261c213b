"""floral's ClientApp for deployments, thin, and the warm worker that makes its messages fast.

    [tool.flwr.app.components]
    clientapp = "floral.flower_client:client_app"

A deployed SuperNode starts a fresh ClientApp process for every message (by design, flower
issue #3670). floral.flower_app's ClientApp then imports PyTorch and builds the model (and
the task, unless the node's `state-dir` holds it built: floral.engines.flower.task_cache),
every message: over a second of CPU per message, more than the message itself costs Flower.
This module imports neither: on a node whose config says `warm-worker=true` (with a
`state-dir`), each message is handed to a worker process, started by the node's first
message, that imports floral once, keeps the built runtime, and answers over a Unix socket in
the node's state folder (`worker.sock`, the node's user only). The worker stops with its
SuperNode, after `worker-idle` seconds without a message (default 600), and when floral's code
changes under it (the next message starts a new one). Without `warm-worker`, a message runs
floral.flower_app's ClientApp in the ClientApp process, as before; importing this module
imports no PyTorch (a message that needs it does).

Processes die with their SuperNode: a watchdog thread in the worker, and in a deployed ClientApp
process, ends the process within a second of its SuperNode's end (killed with SIGKILL
included), even in the middle of a message. It watches the SuperNode itself, found up the
process tree (Flower starts ClientApps from its SuperExec, a child of the SuperNode), and
counts a zombie or a reused process id as gone: a container's init may never reap them.
PR_SET_PDEATHSIG cannot do this job: a worker's parent is the ClientApp process of the node's
first message, which Flower ends after that message.

Either way the same handlers run on the same message contents (floral.engines.flower.client),
so the numbers are the same; the worker's log is `worker.log` in the state folder.

    python -m floral.flower_client --state-dir FOLDER --parent PID   # the worker (started for you)
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

import floral
from floral.engines.flower.mods import privacy_mod
from floral.errors import ConfigError

__all__ = [
    "client_app", "code_fingerprint", "relay", "running", "serve_worker", "supernode_pid", "watch",
]

SOCKET, LOCK, LOG = "worker.sock", "worker.lock", "worker.log"
START_TIMEOUT = 120.0  # seconds for a new worker to listen
IDLE = 600.0  # default seconds a worker waits for a message before it stops
_MAX_SOCKET_PATH = 100  # AF_UNIX paths are limited to 107 bytes on Linux
WATCH_EVERY = 0.5  # seconds between two looks at the SuperNode's process
SUPERNODE = "flower-supernode"  # the command that names a SuperNode's process
_PROC = Path("/proc")


def code_fingerprint() -> str:
    """Names, sizes and modification times of floral's modules: a worker serves only the code
    the ClientApp would run."""
    digest = hashlib.sha256(floral.__version__.encode())
    for path in sorted(Path(floral.__file__).parent.rglob("*.py")):
        stat = path.stat()
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


# -- framing: 8-byte big-endian lengths, then bytes ----------------------------------------------
def _send(sock: socket.socket, *parts: bytes) -> None:
    for part in parts:
        sock.sendall(len(part).to_bytes(8, "big") + part)


def _receive(sock: socket.socket) -> bytes:
    size = int.from_bytes(_exactly(sock, 8), "big")
    return _exactly(sock, size)


def _exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the connection closed mid-message")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _to_bytes(content: RecordDict) -> bytes:
    return bytes(recorddict_to_proto(content).SerializeToString())


def _from_bytes(data: bytes) -> RecordDict:
    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


# -- the ClientApp side ---------------------------------------------------------------------------
def _warm(node_config: dict[str, Any]) -> bool:
    if not node_config.get("warm-worker", False):
        return False
    if "state-dir" not in node_config:
        raise ConfigError("node config: warm-worker=true needs state-dir=FOLDER (the worker's "
                          "socket and the clients' private state live there)")
    return True


def relay(msg: Message, context: Context) -> Message:
    """Have the node's warm worker answer `msg` (starting one when there is none)."""
    folder = Path(str(context.node_config["state-dir"])).expanduser().absolute()
    header = json.dumps({
        "kind": msg.metadata.message_type,
        "node_config": dict(context.node_config),
        "code": code_fingerprint(),
    }).encode()
    body = _to_bytes(msg.content)
    idle = float(context.node_config.get("worker-idle", IDLE))
    for _attempt in range(2):
        with _connection(folder, idle) as sock:
            _send(sock, header, body)
            answer = json.loads(_receive(sock))
            content = _receive(sock)
        if answer.get("stale"):  # floral changed under the worker, which has stopped
            continue
        if answer.get("error"):
            raise RuntimeError(f"warm worker: {answer['error']}")
        return Message(_from_bytes(content), reply_to=msg)
    raise RuntimeError("warm worker: it keeps serving other code than this ClientApp's")


@contextmanager
def _connection(folder: Path, idle: float) -> Iterator[socket.socket]:
    path = folder / SOCKET
    if len(str(path)) > _MAX_SOCKET_PATH:
        raise ConfigError(f"node config: state-dir {str(folder)!r} is too long for the warm "
                          f"worker's socket (at most {_MAX_SOCKET_PATH - len(SOCKET) - 1} "
                          "characters); choose a shorter folder")
    sock = _connect(path)
    if sock is None:
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / LOCK).open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one ClientApp starts the worker; others wait
            sock = _connect(path) or _start_worker(folder, idle)
    try:
        yield sock
    finally:
        sock.close()


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    return sock


def _start_worker(folder: Path, idle: float) -> socket.socket:
    with (folder / LOG).open("a") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "floral.flower_client", "--state-dir", str(folder),
             "--parent", str(supernode_pid()), "--idle", str(idle)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        sock = _connect(folder / SOCKET)
        if sock is not None:
            return sock
        if worker.poll() is not None:
            raise RuntimeError(f"warm worker: exited with code {worker.returncode}; see "
                               f"{folder / LOG}")
        time.sleep(0.05)
    worker.kill()
    raise RuntimeError(
        f"warm worker: not listening after {START_TIMEOUT:.0f} s; see {folder / LOG}"
    )


def _serve(msg: Message, context: Context) -> Message:
    _guard_deployed_process()
    if _warm(context.node_config):
        return relay(msg, context)
    from floral.flower_app import client_app as in_process  # PyTorch and floral's engine

    return in_process(msg, context)


# -- processes that die with their SuperNode -------------------------------------------------------
def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a process from /proc; None when it is gone."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
        fields = text[text.rindex(")") + 2 :].split()  # the command, in parentheses, may hold
        return fields[0], int(fields[1]), int(fields[19])  # spaces and parentheses
    except (OSError, ValueError, IndexError):
        return None


def _is_supernode(pid: int) -> bool:
    try:
        argv = (_PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(Path(arg.decode(errors="replace")).name == SUPERNODE for arg in argv[:2])


def _supernode_ancestor() -> int | None:
    """The SuperNode this process descends from (Linux), None when there is none."""
    pid = os.getppid()
    for _ in range(8):  # ClientApp <- SuperExec <- SuperNode: a few levels at most
        if pid <= 1:
            return None
        if _is_supernode(pid):
            return pid
        stat = _stat(pid)
        if stat is None:
            return None
        pid = stat[1]
    return None


def supernode_pid() -> int:
    """The process a warm worker lives with: the SuperNode above this ClientApp process, or
    (no /proc, or not under a SuperNode) this process's parent."""
    return _supernode_ancestor() or os.getppid()


def running(pid: int, start: int | None = None) -> bool:
    """Whether `pid` runs (and, given its `start` time, is still the same process): a zombie,
    dead but not yet reaped by its parent, or by an init that never reaps, is gone."""
    if not _PROC.is_dir():  # no /proc: a zombie cannot be told from a live process
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X", "x") and start in (None, stat[2])


def watch(pid: int, on_gone: Callable[[], None], every: float = WATCH_EVERY) -> threading.Thread:
    """A daemon thread that calls `on_gone` (which should end the process) once `pid` has
    stopped running; it works while the main thread is busy with a message."""
    stat = _stat(pid)
    start = stat[2] if stat is not None else None

    def look() -> None:
        while running(pid, start):
            time.sleep(every)
        on_gone()

    thread = threading.Thread(target=look, name=f"watch-{pid}", daemon=True)
    thread.start()
    return thread


_guarded = False


def _guard_deployed_process() -> None:
    """In a ClientApp process under a SuperNode: end this process when the SuperNode ends, so
    a message being computed for a killed SuperNode does not go on (once per process)."""
    global _guarded
    if _guarded:
        return
    _guarded = True
    supernode = _supernode_ancestor()
    if supernode is not None:
        watch(supernode, lambda: os._exit(1))


client_app = ClientApp(mods=[privacy_mod])  # SecAgg+'s state lives in this process's context
client_app.query()(_serve)
client_app.train()(_serve)
client_app.evaluate()(_serve)


# -- the worker -----------------------------------------------------------------------------------
def serve_worker(folder: Path, parent: int, idle: float) -> None:
    """Answer messages on `folder/worker.sock` until `parent` (the SuperNode) is gone, `idle`
    seconds pass without one, or floral's code changes."""
    from floral.engines.flower.client import ClientNode
    from floral.flower_app import runtime_for

    node, code = ClientNode(runtime_for), code_fingerprint()
    path = folder / SOCKET
    path.unlink(missing_ok=True)  # a worker killed before it could clean up
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mask = os.umask(0o177)  # the socket: the node's user only
    try:
        server.bind(str(path))
    finally:
        os.umask(mask)
    own = path.stat().st_ino  # the socket file is this worker's until another replaces it
    server.listen()
    server.settimeout(1.0)
    print(f"warm worker {os.getpid()} of SuperNode {parent} on {path}", flush=True)

    def parent_gone() -> None:  # even in the middle of a message
        print(f"SuperNode {parent} is gone: stopping", flush=True)
        _unlink_own(path, own)
        os._exit(0)

    watch(parent, parent_gone)
    last = time.monotonic()
    try:
        while time.monotonic() - last < idle:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(None)
                if not _answer(node, code, conn, path):
                    print("floral's code changed: stopping", flush=True)
                    break
            last = time.monotonic()
    finally:
        _unlink_own(path, own)
        server.close()


def _unlink_own(path: Path, inode: int) -> None:
    """Remove the socket file unless a newer worker has put its own there."""
    try:
        if path.stat().st_ino == inode:
            path.unlink()
    except FileNotFoundError:
        pass


def _answer(node: Any, code: str, conn: socket.socket, path: Path) -> bool:
    """Answer one message; False when the ClientApp runs other code than this worker."""
    header = json.loads(_receive(conn))
    content = _receive(conn)
    if header.get("code") != code:
        path.unlink(missing_ok=True)  # so the ClientApp starts a new worker
        _send(conn, json.dumps({"stale": True}).encode(), b"")
        return False
    context = Context(run_id=0, node_id=0, node_config=header["node_config"], state=RecordDict(),
                      run_config={})
    try:
        reply = node.handle(header["kind"], _from_bytes(content), context)
        _send(conn, b"{}", _to_bytes(reply))
    except Exception as error:  # the ClientApp reports it; the worker serves on
        print(f"{header['kind']}: {type(error).__name__}: {error}", flush=True)
        _send(conn, json.dumps({"error": f"{type(error).__name__}: {error}"}).encode(), b"")
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="floral's warm worker for one SuperNode")
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--parent", required=True, type=int, help="the SuperNode's process id")
    parser.add_argument("--idle", type=float, default=IDLE, help="seconds before stopping")
    args = parser.parse_args(argv)
    serve_worker(args.state_dir, args.parent, args.idle)


if __name__ == "__main__":
    main()
