"""Local engine vs a bare PyTorch loop doing the same FedAvg SGD steps on the same batches.

    python benchmarks/engine_overhead.py [--task mnist5k|synthetic-mlp] [--rounds 20]

Both sides sample the same clients, shuffle with the same seeds, take the same SGD steps and
average the same way; the script checks that they end with the same weights, then prints the
time ratio engine / bare loop (goal: <= 1.25x). Times are this process's CPU time (one
thread), so other work on the machine disturbs them less than wall time; the ratio is given
for the median and the minimum over alternating repeats, measured in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from floral.data import TaskConfig, build_task
from floral.engines import EngineConfig, LocalEngine
from floral.engines.driver import client_seed, sample_clients
from floral.methods import get_method
from floral.models import ModelConfig, build_model
from floral.train.loop import TrainConfig

TASKS = {
    "mnist5k": TaskConfig("mnist5k", "label-shift", 100, 4),
    "synthetic-mlp": TaskConfig("synthetic-mlp", "none", 20, 4),
}


def bare_loop(model: nn.Module, task, train: TrainConfig, rounds: int, seed: int) -> nn.Module:
    """FedAvg written out by hand: copy weights in, SGD steps, examples-weighted mean."""
    loss_fn = (nn.functional.cross_entropy if task.kind == "classification"
               else nn.functional.mse_loss)
    global_params = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=train.lr)
    for r in range(1, rounds + 1):
        sums = [torch.zeros_like(p) for p in global_params]
        total = 0
        for k in sample_clients(seed, r, len(task.clients), train.clients_per_round):
            data = task.clients[k]
            with torch.no_grad():
                for p, g in zip(model.parameters(), global_params):
                    p.copy_(g)
            generator = torch.Generator().manual_seed(client_seed(seed, r, k))
            order = torch.randperm(len(data.x_train), generator=generator)
            for start in range(0, len(order), train.batch_size):
                batch = order[start : start + train.batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss_fn(model(data.x_train[batch]), data.y_train[batch]).backward()
                optimizer.step()
            n = data.num_train
            with torch.no_grad():
                for s, p in zip(sums, model.parameters()):
                    s.add_(p, alpha=n)
            total += n
        global_params = [s / total for s in sums]
    with torch.no_grad():
        for p, g in zip(model.parameters(), global_params):
            p.copy_(g)
    return model


def run_engine(model: nn.Module, task, train: TrainConfig, rounds: int, seed: int) -> LocalEngine:
    # One client at a time, as the bare loop (benchmarks/bare_batched.py times the batched
    # default against a batched bare loop).
    never = EngineConfig(eval_every=10**9, batch_clients=0)
    engine = LocalEngine(get_method("fedavg"), task, model, train, never, seed)
    for _ in range(rounds):
        engine.run_round()
    return engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="mnist5k")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = build_task(TASKS[args.task], seed=0)
    train = TrainConfig(rounds=10**9, clients_per_round=0.2, batch_size=32, lr=0.05)

    def fresh() -> nn.Module:
        torch.manual_seed(0)
        return build_model(ModelConfig(), task)

    engine = run_engine(fresh(), task, train, args.rounds, seed=0)
    bare = bare_loop(fresh(), task, train, args.rounds, seed=0)
    diff = max(
        (engine.global_state[name] - p.detach()).abs().max().item()
        for name, p in bare.named_parameters()
    )
    times = {"bare": [], "engine": []}
    for _ in range(args.repeats):
        for name, fn in (("bare", bare_loop), ("engine", run_engine)):
            model = fresh()
            start = time.process_time()
            fn(model, task, train, args.rounds, 0)
            times[name].append(time.process_time() - start)
    bare_s, engine_s = statistics.median(times["bare"]), statistics.median(times["engine"])
    best_ratio = min(times["engine"]) / min(times["bare"])
    steps = sum(
        -(-task.clients[k].num_train // train.batch_size)
        for r in range(1, args.rounds + 1)
        for k in sample_clients(0, r, len(task.clients), train.clients_per_round)
    )
    print(f"task {args.task}: {len(task.clients)} clients, {args.rounds} rounds, "
          f"{steps} SGD steps, threads {args.threads}")
    print(f"final weights max |engine - bare| = {diff:.2e}")
    print(f"bare loop   {bare_s:.3f} s CPU (median), {min(times['bare']):.3f} s (min)")
    print(f"engine      {engine_s:.3f} s CPU (median), {min(times['engine']):.3f} s (min)")
    print(f"ratio engine / bare = {engine_s / bare_s:.3f}x median, {best_ratio:.3f}x min"
          "  (goal <= 1.25x)")


if __name__ == "__main__":
    main()
