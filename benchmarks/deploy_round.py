"""Seconds per deployed round: floral's Flower app against Flower's own floor, same nodes.

    python benchmarks/deploy_round.py [--nodes 2] [--rounds 5] [--repeat 1]

Starts one federation on 127.0.0.1 (a SuperLink and `--nodes` SuperNodes: the deployment
test's harness, tests/support/federation.py) and runs on it, in turn, a trivial Flower app with
floral's message pattern (benchmarks/flower_floor: each round a train message to every node
with the global arrays, echoed back, then an evaluate message; no torch) and floral's example
app (examples/flower-app: FLoRAL on synthetic-mlp, one client per node, evaluation every
round): first on plain nodes, where every floral message imports PyTorch and builds the task
in a fresh ClientApp process, then on the same SuperLink with the SuperNodes restarted with
`warm-worker=true` (floral.flower_client), and the floor again. Each deployed message starts a
fresh ClientApp process on its node, so the trivial app's round is the floor of any Flower
deployment on this machine. A round is timed by each ServerApp, from its first message to the
last reply of its evaluation (floral: the `seconds` column of metrics.csv); round 1 is dropped
and the median of the others reported, with the ratios to the floor. Then the cost of a
ClientApp process itself: importing the app (and, for floral without a warm worker, building
its runtime) in a fresh Python, as each message pays it; and, for a warm node, what the thin
ClientApp does with a train message: in a fresh Python, the import, then the relay to a running
warm worker (serialization, the Unix socket, the worker's work), against the worker's work
alone (the train handler called in this process).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOOR_APP = ROOT / "benchmarks" / "flower_floor"
FLORAL_APP = ROOT / "examples" / "flower-app"
sys.path.insert(0, str(ROOT / "tests"))

from support.federation import Federation  # noqa: E402

FLORAL_START = """
import time
start = time.perf_counter()
from floral.flower_app import client_app, runtime_for
text = open({text!r}).read()
runtime_for(text)
print(time.perf_counter() - start)
"""
THIN_START = """
import time
start = time.perf_counter()
from floral.flower_client import client_app
print(time.perf_counter() - start)
"""
FLOOR_START = """
import sys, time
start = time.perf_counter()
sys.path.insert(0, {folder!r})
import floor_app
print(time.perf_counter() - start)
"""


# A warm node's ClientApp process, in a fresh Python: import the thin app, relay a train message
# (its records in a file) to the running worker; seconds for each, and whether torch was loaded.
RELAY = """
import sys, time
start = time.perf_counter()
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from floral.flower_client import _from_bytes, relay
imported = time.perf_counter()
TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
content = _from_bytes(open({records!r}, "rb").read())
msg = Message(content, 1000, "train")
msg.metadata.__dict__["_message_id"] = "train-1"  # as Flower's grids set it
context = Context(run_id=1, node_id=1000, state=RecordDict(), run_config={{}},
                  node_config={node_config!r})
relay(msg, context)
print(imported - start, time.perf_counter() - imported, "torch" in sys.modules)
"""


def _median(seconds: list[float]) -> float:
    return statistics.median(seconds[1:] if len(seconds) > 1 else seconds)


def run_floor(federation: Federation, work: Path, nodes: int, rounds: int, floats: int) -> float:
    out = work / f"floor-{time.monotonic_ns()}.json"
    done = federation.run(
        FLOOR_APP, f'rounds={rounds} num-nodes={nodes} floats={floats} out="{out}"'
    )
    if done.returncode != 0:
        raise SystemExit(f"the floor app failed:\n{done.stdout}{done.stderr}")
    return _median(json.loads(out.read_text())["seconds"])


def restart_nodes(federation: Federation, warm: bool) -> None:
    federation.warm_nodes = frozenset(range(federation.num_nodes)) if warm else frozenset()
    for k in range(federation.num_nodes):
        federation.stop_node(k)
        federation.start_node(k)


def run_floral(federation: Federation, work: Path, nodes: int, rounds: int) -> tuple[float, int]:
    """Median seconds per round, and the bytes of the global arrays sent to one client."""
    out = work / f"floral-{time.monotonic_ns()}"
    done = federation.run(FLORAL_APP, (
        f'task.num_clients={nodes} train.rounds={rounds} engine.eval_every=1 '
        f'engine.checkpoint_every=0 output.dir="{out}"'
    ))
    if done.returncode != 0:
        raise SystemExit(f"floral's app failed:\n{done.stdout}{done.stderr}")
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    elapsed = [float(r["seconds"]) for r in rows]  # cumulative, row 0 = the initial evaluation
    per_round = [b - a for a, b in zip(elapsed, elapsed[1:], strict=False)]
    bytes_down = int(rows[-1]["bytes_down"]) // (rounds * nodes)
    return _median(per_round), bytes_down


def process_start(code: str, times: int = 3) -> float:
    """Median seconds to import an app (and build floral's runtime) in a fresh Python."""
    seconds = []
    for _ in range(times):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True)
        seconds.append(float(done.stdout.strip().splitlines()[-1]))
    return statistics.median(seconds)


def relay_costs(text: Path, work: Path, nodes: int, times: int = 5) -> tuple[float, float, float]:
    """A warm node's train message without Flower: medians of the thin ClientApp's import and
    relay in a fresh Python, and of the train handler's work alone (in this process)."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from floral.engines.flower.client import ClientNode
    from floral.flower_app import runtime_for
    from floral.flower_client import _to_bytes, relay

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    experiment, lineage = text.read_text(), uuid.uuid4().hex

    def message(kind: str, content: RecordDict) -> Message:
        msg = Message(content, 1000, kind)
        msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's grids set it
        return msg

    def context(folder: Path) -> Context:
        config = {"partition-id": 0, "num-partitions": nodes, "state-dir": str(folder),
                  "warm-worker": True, "worker-idle": 120.0}
        return Context(run_id=1, node_id=1000, state=RecordDict(), run_config={},
                       node_config=config)

    folder = work / "relay-node"
    hello = relay(message("query", RecordDict({"floral.config": ConfigRecord(  # starts a worker
        {"experiment": experiment, "round": 0, "lineage": lineage, "send_initial": True})})),
        context(folder))
    train = RecordDict({
        "floral.config": ConfigRecord({"experiment": experiment, "round": 1, "lineage": lineage}),
        "floral.global": hello.content["floral.initial"],
    })
    records = work / "train-message.bin"
    records.write_bytes(_to_bytes(train))
    code = RELAY.format(records=str(records), node_config=context(folder).node_config)
    imports, relays = [], []
    try:
        for _ in range(times):
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  check=True)
            seconds, relayed, torch_loaded = done.stdout.split()
            assert torch_loaded == "False", "the thin ClientApp loaded torch"
            imports.append(float(seconds))
            relays.append(float(relayed))
    finally:
        for line in (folder / "worker.log").read_text().splitlines():
            if line.startswith("warm worker "):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(line.split()[2]), signal.SIGTERM)
    node, handled = ClientNode(runtime_for), []
    own = context(work / "handler-node")
    for _ in range(times + 1):  # the first call builds the runtime, as a worker's first does
        start = time.perf_counter()
        node.handle("train", train, own)
        handled.append(time.perf_counter() - start)
    return statistics.median(imports), statistics.median(relays), statistics.median(handled[1:])


def experiment_text(nodes: int, work: Path) -> Path:
    """The experiment floral's app sends its nodes, as its ServerApp resolves it."""
    from flwr.common.config import flatten_dict

    from floral.config import tomllib
    from floral.engines.flower import experiment_from_run_config
    from floral.experiment import resolve_config
    from floral.flower_app import experiment_text as text_of

    app = tomllib.loads((FLORAL_APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    data, overrides = experiment_from_run_config(flatten_dict(app["config"]))
    config = resolve_config(data, [*overrides, f"task.num_clients={nodes}", "engine.name=flower"])
    path = work / "experiment.toml"
    path.write_text(text_of(config))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=1, help="alternate the two apps N times")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="deploy-round-") as folder:
        work = Path(folder)
        floor, cold, warm, sent = [], [], [], 0
        with Federation(work, num_nodes=args.nodes) as federation:
            for _ in range(args.repeat):
                seconds, sent = run_floral(federation, work, args.nodes, args.rounds)
                cold.append(seconds)
                floor.append(run_floor(federation, work, args.nodes, args.rounds, sent // 4))
            restart_nodes(federation, warm=True)
            for _ in range(args.repeat):
                warm.append(run_floral(federation, work, args.nodes, args.rounds)[0])
                floor.append(run_floor(federation, work, args.nodes, args.rounds, sent // 4))
        text = experiment_text(args.nodes, work)
        start_floral = process_start(FLORAL_START.format(text=str(text)))
        start_thin = process_start(THIN_START)
        start_floor = process_start(FLOOR_START.format(folder=str(FLOOR_APP)))
        relay_import, relay_seconds, handler = relay_costs(text, work, args.nodes)
    a, b, c = (statistics.median(x) for x in (floor, cold, warm))
    print(f"deployed round on {args.nodes} SuperNodes at 127.0.0.1, {args.rounds} rounds x "
          f"{args.repeat}: train + evaluate messages to every node, {sent} bytes down per node")
    print(f"Flower floor (trivial app)          {a:6.2f} s / round (median of rounds 2.., "
          f"{len(floor)} runs)")
    print(f"floral, a ClientApp per message     {b:6.2f} s / round  = {b / a:.2f}x the floor")
    print(f"floral, warm-worker=true            {c:6.2f} s / round  = {c / a:.2f}x the floor "
          "(goal <= 1.2x)")
    print("each run's median, in order: floor " + " ".join(f"{x:.2f}" for x in floor)
          + "; floral " + " ".join(f"{x:.2f}" for x in cold)
          + "; warm " + " ".join(f"{x:.2f}" for x in warm))
    print(f"a ClientApp process, fresh Python: Flower floor {start_floor:.2f} s (import); floral "
          f"{start_floral:.2f} s (import + runtime build), thin {start_thin:.2f} s (import)")
    print(f"a warm node's train message without Flower: the thin ClientApp's import "
          f"{relay_import:.3f} s, its relay to the worker {relay_seconds:.3f} s, of which the "
          f"worker's train handler {handler:.3f} s")


if __name__ == "__main__":
    main()
