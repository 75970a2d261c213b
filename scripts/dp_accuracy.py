"""Accuracy against privacy spent (DP-FedAvg, central): FedAvg, FLASC and FLoRAL on digits.

    python scripts/dp_accuracy.py [--rounds 30] [--seeds 0,1,2]

scikit-learn's digits over 20 clients, half of them sampled each round, MLP 64-32-10, local
SGD lr 0.05; two tasks: no shift, and label shift in 2 clusters (cluster c sees label y as
(y + c) mod 10, which one model cannot fit for both). Each client's update is clipped to L2
norm 0.5 and Gaussian noise of multiplier z is added to the sum; epsilon at delta = 1e-5 from
floral's RDP accountant (floral.train.privacy). FLASC sends the top 25% of its update. FLoRAL
has 2 adaptors of rank 10% (router lr 5): `floral` without the preconditioned factor step and
adaptor lr 0.2, `floral-pc` with it (the method's default). Cells are the test accuracy after
the last round, the mean over the seeds (a run the noise drives to NaN counts as chance, 10).
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

from floral.errors import DivergedError
from floral.experiment import resolve_config
from floral.run import run_experiment
from floral.train.privacy import dp_epsilon

TASKS = {"no shift": ("none", 1), "label shift": ("label-shift", 2)}
FLORAL = {"name": "floral", "num_adaptors": 2, "rank": 0.1}
# name -> (method table, train settings, other tables)
METHODS: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "fedavg": ({"name": "fedavg"}, {}, {}),
    "flasc": ({"name": "flasc"}, {}, {"comm": {"upload": "topk:0.25"}}),
    "floral": ({**FLORAL, "precondition": False}, {"router_lr": 5.0, "adaptor_lr": 0.2}, {}),
    "floral-pc": (FLORAL, {"router_lr": 5.0}, {}),
}
NOISE = (0.0, 0.5, 1.0, 2.0)
CLIP, CLIENTS, FRACTION = 0.5, 20, 0.5


def accuracy(task: str, method: str, z: float, rounds: int, seed: int, out: str) -> float:
    shift, clusters = TASKS[task]
    method_table, train, tables = METHODS[method]
    config = resolve_config({
        "name": "dp", "seed": seed,
        "task": {"dataset": "digits", "shift": shift, "num_clients": CLIENTS,
                 "num_clusters": clusters},
        "model": {"name": "mlp", "hidden": [32]},
        "method": method_table,
        "train": {"rounds": rounds, "clients_per_round": FRACTION, "batch_size": 16,
                  "lr": 0.05, "dp_clip": CLIP if z else 0.0, "dp_noise": z, **train},
        "engine": {"eval_every": rounds}, **tables,
    })
    try:
        final = run_experiment(config, f"{out}/{task}-{method}-{z}-{seed}").final
    except DivergedError:  # the noise drove the model to NaN: counted as chance
        return 10.0
    return float(final["accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    epsilons = [dp_epsilon(FRACTION, z, args.rounds, 1e-5) for z in NOISE]
    print(f"digits, {CLIENTS} clients, {args.rounds} rounds, clip {CLIP}, seeds {args.seeds}")
    print(f"{'task':<12} {'method':<10}" + "".join(f"{f'z={z:g}':>9}" for z in NOISE))
    print(f"{'':<12} {'epsilon':<10}" + "".join(f"{e:9.1f}" for e in epsilons))
    with tempfile.TemporaryDirectory() as out:
        for task in TASKS:
            for method in METHODS:
                cells = [sum(accuracy(task, method, z, args.rounds, s, out) for s in seeds)
                         / len(seeds) for z in NOISE]
                print(f"{task:<12} {method:<10}" + "".join(f"{a:9.1f}" for a in cells),
                      flush=True)


if __name__ == "__main__":
    main()
