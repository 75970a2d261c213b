"""Time per round and CPU to the first round: this tree against another checkout of floral.

    python benchmarks/round_vs_base.py --base /tmp/floral-base [--configs synthetic-linear,
        synthetic-mlp] [--methods fedavg,floral,floral-oracle,local-adaptor] [--rounds 50]
        [--repeats 3]

Make the other checkout with `git worktree add --detach /tmp/floral-base <commit>`. For every
config and method, `floral run configs/<config>.toml` runs in a fresh process from each tree
(`PYTHONPATH=<tree>/src`), alternating, `--repeats` times, with `train.rounds` set and one
evaluation at the end; everything else at the config's defaults. It prints the median over the
repeats of the engine's own seconds per round (`seconds_per_round` of summary.json, wall time,
evaluation included), and of the process's CPU seconds for a run of one round (import, build,
round 1 and its evaluation), and the ratios base / this tree (above 1: this tree is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def run(tree: Path, config: str, method: str, rounds: int, out: Path) -> tuple[float, float]:
    """(seconds per round, CPU seconds of the process) of one run from `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(
        [sys.executable, "-m", "floral.cli", "run", str(tree / "configs" / f"{config}.toml"),
         "--quiet", "--overwrite", "--out", str(out), "--set", f"method.name={method}",
         "--set", f"train.rounds={rounds}", "--set", f"engine.eval_every={rounds}"],
        env=env, cwd=tree, check=True, capture_output=True,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    summary = json.loads((out / "summary.json").read_text())
    return summary["seconds_per_round"], cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--configs", default="synthetic-linear,synthetic-mlp")
    parser.add_argument("--methods", default="fedavg,floral,floral-oracle,local-adaptor")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    trees = {"base": args.base.resolve(), "this": HERE}
    print(f"base {trees['base']}, this {HERE}; {args.rounds} rounds, median of {args.repeats} "
          f"alternating runs; s/round is wall time, CPU-1 the CPU seconds of a 1-round run")
    print(f"{'config':18s} {'method':14s} {'base s/round':>12s} {'this':>8s} {'ratio':>6s}"
          f" {'base CPU-1':>10s} {'this':>6s} {'ratio':>6s}")
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs.split(","):
            for method in args.methods.split(","):
                per_round: dict[str, list[float]] = {k: [] for k in trees}
                first: dict[str, list[float]] = {k: [] for k in trees}
                for repeat in range(args.repeats):
                    order = list(trees) if repeat % 2 == 0 else list(reversed(trees))
                    for key in order:
                        out = Path(tmp) / key
                        per_round[key].append(run(trees[key], config, method, args.rounds,
                                                  out)[0])
                        first[key].append(run(trees[key], config, method, 1, out)[1])
                base, this = (statistics.median(per_round[k]) for k in ("base", "this"))
                base1, this1 = (statistics.median(first[k]) for k in ("base", "this"))
                print(f"{config:18s} {method:14s} {base:12.4f} {this:8.4f} {base / this:6.2f}"
                      f" {base1:10.2f} {this1:6.2f} {base1 / this1:6.2f}", flush=True)


if __name__ == "__main__":
    main()
