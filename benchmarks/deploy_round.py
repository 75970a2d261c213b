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
its runtime) in a fresh Python, as each message pays it.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
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
    a, b, c = (statistics.median(x) for x in (floor, cold, warm))
    print(f"deployed round on {args.nodes} SuperNodes at 127.0.0.1, {args.rounds} rounds x "
          f"{args.repeat}: train + evaluate messages to every node, {sent} bytes down per node")
    print(f"Flower floor (trivial app)          {a:6.2f} s / round (median of rounds 2.., "
          f"{len(floor)} runs)")
    print(f"floral, a ClientApp per message     {b:6.2f} s / round  = {b / a:.2f}x the floor")
    print(f"floral, warm-worker=true            {c:6.2f} s / round  = {c / a:.2f}x the floor "
          "(goal <= 1.2x)")
    print(f"a ClientApp process, fresh Python: Flower floor {start_floor:.2f} s (import); floral "
          f"{start_floral:.2f} s (import + runtime build), thin {start_thin:.2f} s (import)")


if __name__ == "__main__":
    main()
