"""Robust aggregation against clients that send bad updates: accuracy, clean and attacked.

    python scripts/robust_aggregation.py [--rounds 30] [--bad 2]

FedAvg on scikit-learn's digits (10 clients, all sampled each round, MLP 64-32-10); the first
`--bad` clients send their update sign-flipped and scaled by 10. For each server rule
(`train.aggregation`: mean, median, trimmed:0.2) it prints the final test accuracy of a clean
run and of the attacked one.
"""

from __future__ import annotations

import argparse

from floral.engines import LocalEngine
from floral.experiment import build_setup, resolve_config
from floral.methods.base import WEIGHT_SUFFIX, ClientJob, ClientUpdate
from floral.methods.fedavg import FedAvg
from floral.train.state import StateSlots

RULES = ("mean", "median", "trimmed:0.2")


class SignFlipping(FedAvg):
    """FedAvg whose clients below `bad` send -10 times their update."""

    batchable = False  # its step differs from the default one

    def __init__(self, bad: int) -> None:
        super().__init__()
        self.bad = bad

    def finish_step(self, slots: StateSlots, job: ClientJob, train_loss: float) -> ClientUpdate:
        update = super().finish_step(slots, job, train_loss)
        if job.client < self.bad:
            update.upload = {
                k: v if k.endswith(WEIGHT_SUFFIX) else -10 * v for k, v in update.upload.items()
            }
        return update


def accuracy(rule: str, bad: int, rounds: int) -> float:
    config = resolve_config({
        "name": "robust", "seed": 0,
        "task": {"dataset": "digits", "shift": "none", "num_clients": 10, "num_clusters": 1},
        "model": {"name": "mlp", "hidden": [32]},
        "method": {"name": "fedavg"},
        "train": {"rounds": rounds, "clients_per_round": 1.0, "batch_size": 16, "lr": 0.05,
                  "aggregation": rule},
        "engine": {"eval_every": rounds},
    })
    _, task, model = build_setup(config)
    engine = LocalEngine(SignFlipping(bad), task, model, config.train, config.engine, config.seed)
    engine.run()
    return engine.evaluate()["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--bad", type=int, default=2)
    args = parser.parse_args()
    print(f"digits, 10 clients, {args.rounds} rounds; attacked: clients 0..{args.bad - 1} "
          "send -10 x their update")
    print(f"{'rule':<12} {'clean':>7} {'attacked':>9}")
    for rule in RULES:
        clean, attacked = accuracy(rule, 0, args.rounds), accuracy(rule, args.bad, args.rounds)
        print(f"{rule:<12} {clean:7.1f} {attacked:9.1f}")


if __name__ == "__main__":
    main()
