"""Robust aggregation against clients that send bad updates: a table of final accuracy.

    python scripts/robust_aggregation.py [--rounds 30] [--seeds 0,1,2] [--kind sign-flip]

FedAvg on scikit-learn's digits (10 clients, MLP 64-32-10), attacked through the experiment's
`[attack]` table: a seeded fraction of the clients sends -10 times its update (`sign-flip`, or
another `--kind`). For each server rule (`train.aggregation`), attacker fraction and
participation (all clients, or half, each round) it prints the final test accuracy, mean ± std
over the seeds, as a Markdown table.
"""

from __future__ import annotations

import argparse
import logging
import statistics

from floral.experiment import build_engine, resolve_config

RULES = ("mean", "median", "trimmed:0.2")
FRACTIONS = (0.0, 0.1, 0.2, 0.3)
PARTICIPATION = (1.0, 0.5)


def accuracy(rule: str, fraction: float, participation: float, seed: int, rounds: int,
             kind: str = "sign-flip") -> float:
    """Final test accuracy (%) of one attacked (or, at fraction 0, clean) run."""
    attack = {"kind": kind, "fraction": fraction} if fraction > 0 else {}
    config = resolve_config({
        "name": "robust", "seed": seed,
        "task": {"dataset": "digits", "shift": "none", "num_clients": 10, "num_clusters": 1},
        "model": {"name": "mlp", "hidden": [32]},
        "method": {"name": "fedavg"},
        "train": {"rounds": rounds, "clients_per_round": participation, "batch_size": 16,
                  "lr": 0.05, "aggregation": rule},
        # A ruined model is the measurement here, not a reason to stop.
        "engine": {"eval_every": rounds, "divergence_factor": 0.0},
        "attack": attack,
    })
    engine, _ = build_engine(config)
    engine.run()
    return engine.evaluate()["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--kind", default="sign-flip")
    args = parser.parse_args()
    logging.getLogger("floral").setLevel(logging.ERROR)  # the table says what the warnings say
    seeds = [int(s) for s in args.seeds.split(",")]
    columns = [(f, p) for p in PARTICIPATION for f in FRACTIONS]
    print(f"digits, 10 clients, {args.rounds} rounds, {args.kind} attackers; accuracy (%), "
          f"mean ± std over seeds {args.seeds}")
    print()
    print("| rule | " + " | ".join(f"{f:.0%} bad, {p:.0%} sampled" for f, p in columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for rule in RULES:
        cells = []
        for fraction, participation in columns:
            values = [accuracy(rule, fraction, participation, s, args.rounds, args.kind)
                      for s in seeds]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {spread:.1f}")
        print(f"| {rule} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
