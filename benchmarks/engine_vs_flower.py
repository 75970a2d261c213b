"""Seconds per round: the local engine against a Flower simulation of the same experiment.

    python benchmarks/engine_vs_flower.py [--task synthetic-mlp|digits] [--method floral]
                                          [--clients 10] [--fraction 1.0] [--rounds 10]

Both engines run the same experiment and seed (and end with the same metrics, which the script
checks). A round is timed from sampling to aggregation, evaluation excluded; the first round is
dropped as warm-up (Flower's Ray workers build the model and task there) and the median of the
others is reported, with the ratio Flower / local. Ray's start-up is reported apart: it is paid
once per simulation, not per round. Needs `pip install 'floral-lora[flower]'`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from floral.engines.driver import RoundResult
from floral.engines.flower import require_flower
from floral.experiment import ExperimentConfig, RunSummary, resolve_config
from floral.run import run_experiment

TASKS: dict[str, dict[str, Any]] = {
    "synthetic-mlp": {
        "task": {"dataset": "synthetic-mlp", "shift": "none", "num_clusters": 4},
        "model": {"name": "mlp", "hidden": [20]},
        "train": {"batch_size": 8, "lr": 0.03, "router_lr": 0.1},
    },
    "digits": {
        "task": {"dataset": "digits", "shift": "label-shift", "num_clusters": 4},
        "model": {"name": "mlp", "hidden": [64]},
        "train": {"batch_size": 16, "lr": 0.1, "router_lr": 1.0},
    },
}


def experiment(args: argparse.Namespace, engine: str) -> ExperimentConfig:
    base = TASKS[args.task]
    return resolve_config({
        "name": f"bench-{args.task}-{engine}",
        "seed": 0,
        "task": {**base["task"], "num_clients": args.clients},
        "model": base["model"],
        "method": {"name": args.method},
        "train": {**base["train"], "rounds": args.rounds, "clients_per_round": args.fraction},
        # One client at a time on both: a Flower node trains one client per message.
        "engine": {"name": engine, "eval_every": args.rounds, "batch_clients": 0},
    })


def timed_run(config: ExperimentConfig, out: Path) -> tuple[RunSummary, list[float], float]:
    """(summary, seconds of each round, seconds before the first round's clients ran)."""
    rounds: list[float] = []
    start = time.perf_counter()
    first: list[float] = []

    def on_round(result: RoundResult, latest: dict[str, float]) -> None:
        if not first:
            first.append(time.perf_counter() - start - result.seconds)
        rounds.append(result.seconds)

    if config.engine.name == "flower":
        from floral.flower_app import simulate as runner  # needs Flower: imported on use
    else:
        runner = run_experiment
    summary = runner(config, out, on_round=on_round)
    return summary, rounds, first[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="synthetic-mlp")
    parser.add_argument("--method", default="floral")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--fraction", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    require_flower()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        local, local_rounds, _ = timed_run(experiment(args, "local"), Path(tmp) / "local")
        flower, flower_rounds, setup = timed_run(experiment(args, "flower"), Path(tmp) / "flower")
    same = all(
        abs(flower.final[k] - v) <= 1e-6 * max(1.0, abs(v)) for k, v in local.final.items()
    )
    local_s = statistics.median(local_rounds[1:] or local_rounds)
    flower_s = statistics.median(flower_rounds[1:] or flower_rounds)
    print(f"{args.task}, {args.method}: {args.clients} clients, fraction {args.fraction:g} "
          f"per round, {args.rounds} rounds; final {local.metric} local "
          f"{local.final[local.metric]:.6g}, "
          f"flower {flower.final[flower.metric]:.6g} ({'same' if same else 'DIFFERENT'})")
    print(f"local engine       {local_s * 1000:9.1f} ms / round (median of rounds 2..)")
    print(f"Flower simulation  {flower_s * 1000:9.1f} ms / round (median of rounds 2..)")
    print(f"ratio Flower / local = {flower_s / local_s:.1f}x; Flower's set-up before round 1 "
          f"(Ray, nodes, initial evaluation): {setup:.1f} s")


if __name__ == "__main__":
    main()
