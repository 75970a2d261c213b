"""Batched client execution (`engine.batch_clients`) vs the sequential engine vs a bare loop.

    python benchmarks/batched_clients.py [--task mnist5k|synthetic-mlp] [--batch-clients 20]
        [--method fedavg|floral|local-adaptor] [--clients-per-round 0.2] [--rounds 20]

The same rounds run through the local engine one client at a time and with up to N clients per
vmapped batch; for FedAvg also through the bare PyTorch loop of `engine_overhead.py` (same
batches, same SGD steps). The script prints the largest difference between the final global
tensors (float32 rounding: batched matmuls add up in another order) and the CPU-time ratios
batched / sequential and batched / bare loop, median and minimum over alternating repeats.
FLoRAL runs with its router noise off, so both engines take the same steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_overhead import TASKS, bare_loop  # noqa: E402  (a sibling script, not a package)

from floral.data import FederatedTask, build_task  # noqa: E402
from floral.engines import EngineConfig, LocalEngine  # noqa: E402
from floral.methods import get_method  # noqa: E402
from floral.models import ModelConfig, build_model  # noqa: E402
from floral.train.loop import TrainConfig  # noqa: E402

OPTIONS = {"floral": {"noise": 0.0}}


def engine_run(method_name: str, batch_clients: int) -> Callable:
    """A runner with the bare loop's signature: (model, task, train, rounds, seed) -> state."""

    def run(model: nn.Module, task: FederatedTask, train: TrainConfig, rounds: int, seed: int):
        config = EngineConfig(eval_every=10**9, batch_clients=batch_clients)
        engine = LocalEngine(get_method(method_name, OPTIONS.get(method_name)), task, model,
                             train, config, seed)
        for _ in range(rounds):
            engine.run_round()
        return engine.global_state

    return run


def bare_run(model: nn.Module, task: FederatedTask, train: TrainConfig, rounds: int, seed: int):
    trained = bare_loop(model, task, train, rounds, seed)
    return {n: p.detach() for n, p in trained.named_parameters()}


def time_runs(runners: dict[str, Callable], fresh: Callable, task, train, rounds: int,
              repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            model = fresh()
            start = time.process_time()
            run(model, task, train, rounds, 0)
            times[name].append(time.process_time() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="mnist5k")
    parser.add_argument("--method", choices=["fedavg", "floral", "local-adaptor"],
                        default="fedavg")
    parser.add_argument("--batch-clients", type=int, default=20)
    parser.add_argument("--clients-per-round", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = build_task(TASKS[args.task], seed=0)
    fraction = args.clients_per_round
    train = TrainConfig(rounds=10**9, clients_per_round=fraction, batch_size=32, lr=0.05)
    method = get_method(args.method, OPTIONS.get(args.method))

    def fresh() -> nn.Module:
        torch.manual_seed(0)
        return method.build_model(build_model(ModelConfig(), task), task)

    runners = {"sequential": engine_run(args.method, 0),
               "batched": engine_run(args.method, args.batch_clients)}
    if args.method == "fedavg":
        runners["bare"] = bare_run
    finals = {name: run(fresh(), task, train, args.rounds, 0) for name, run in runners.items()}
    diff = max((finals["batched"][n] - v).abs().max().item()
               for n, v in finals["sequential"].items())
    times = time_runs(runners, fresh, task, train, args.rounds, args.repeats)
    print(f"task {args.task}: {len(task.clients)} clients, method {args.method}, "
          f"{args.rounds} rounds, {round(fraction * len(task.clients))} clients per round, "
          f"batch_clients {args.batch_clients}, threads {args.threads}")
    print(f"final global max |batched - sequential| = {diff:.2e}")
    for name, values in times.items():
        print(f"{name:<11} {statistics.median(values):.3f} s CPU (median), "
              f"{min(values):.3f} s (min)")
    for base in [name for name in ("sequential", "bare") if name in times]:
        ratio = statistics.median(times["batched"]) / statistics.median(times[base])
        best = min(times["batched"]) / min(times[base])
        print(f"ratio batched / {base} = {ratio:.3f}x median, {best:.3f}x min")


if __name__ == "__main__":
    main()
