"""Accuracy against privacy spent (DP-FedAvg, central): FedAvg and FLASC on digits.

    python docs/dp_accuracy.py [--rounds 30]

20 clients (scikit-learn's digits), half sampled each round, MLP 64-32-10; each client's update
clipped to L2 norm 0.5, Gaussian noise of multiplier z on the sum; epsilon at delta = 1e-5 from
floral's RDP accountant (floral.train.privacy). FLASC sends the top 25% of its update.
"""

from __future__ import annotations

import argparse
import tempfile

from floral.experiment import resolve_config
from floral.run import run_experiment

METHODS = {"fedavg": {}, "flasc": {"comm": {"upload": "topk:0.25"}}}
NOISE = (0.0, 0.5, 1.0, 2.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    print(f"{'method':<8} {'z':>4} {'epsilon':>8} {'accuracy':>9}")
    with tempfile.TemporaryDirectory() as out:
        for method, tables in METHODS.items():
            for z in NOISE:
                train = {"rounds": args.rounds, "clients_per_round": 0.5, "batch_size": 16,
                         "lr": 0.05, "dp_clip": 0.5 if z else 0.0, "dp_noise": z}
                config = resolve_config({
                    "name": "dp", "seed": 0,
                    "task": {"dataset": "digits", "shift": "none", "num_clients": 20,
                             "num_clusters": 1},
                    "model": {"name": "mlp", "hidden": [32]},
                    "method": {"name": method}, "train": train,
                    "engine": {"eval_every": args.rounds}, **tables,
                })
                final = run_experiment(config, f"{out}/{method}-{z}").final
                epsilon = final.get("dp_epsilon", float("inf"))
                print(f"{method:<8} {z:4.1f} {epsilon:8.1f} {final['accuracy']:9.1f}")


if __name__ == "__main__":
    main()
