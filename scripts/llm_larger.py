"""The tables and figure of docs/llm-larger.md, from the records its grid keeps.

    python scripts/llm_larger.py docs/results/llm-larger                  # the tables
    python scripts/llm_larger.py docs/results/llm-larger --figures docs   # and the figure
    python scripts/llm_larger.py results/llm-larger --keep docs/results/llm-larger

OUT holds one folder per language set (`bash scripts/llm_larger.sh` writes `de-fr-es-it` and
`pt-pl-cs-tr`), each a `floral sweep` folder: `grid.json`, and per run `config.toml`,
`metrics.csv`, `summary.json` and `cost.json`, the only files read here (`--keep` copies
exactly these of every finished run, and nothing else). A setting is a language set and a
seed. Two rows need no training: the frozen base is round 0 of the setting's runs (every
adaptor starts at B = 0), and "copy the source" answers every held-out prompt with the
English name itself.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

if not __package__:  # run as a file: the repository root makes scripts.* importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from floral.checkpoint import read_toml  # noqa: E402
from floral.compare import run_cost  # noqa: E402
from scripts.llm_family import _history  # noqa: E402

RECORDS = ("config.toml", "metrics.csv", "summary.json", "cost.json")
# The grid's method labels, in the table's order, with their names.
METHODS = {
    "fedit": "FedIT",
    "local-adaptor:train_base=false": "local adaptor",
    "floral": "FLoRAL, learned router",
    "floral-oracle:train_base=false": "FLoRAL, oracle router",
    "floral-seeded:train_base=false": "floral-seeded",
    "fdlora:fusion_samples=16:fusion_candidates=4": "FDLoRA",
    "fedsa-lora": "FedSA-LoRA",
}
ORACLE, SEEDED = "floral-oracle:train_base=false", "floral-seeded:train_base=false"
LEARNED = "floral"
# The goal: at least this much chrF over FedIT and over the copy, at most this far below the
# oracle router, and routers that group the clients by language at least this well.
OVER, WITHIN, ARI = 10.0, 3.0, 0.9


@dataclass
class Run:
    history: list[dict[str, float]]  # metrics.csv, one row per evaluated round
    config: dict
    cpu_seconds: float | None  # None: an attempt of the run recorded no CPU time

    @property
    def last(self) -> dict[str, float]:
        return self.history[-1]


Setting = tuple[str, int]  # (language set, seed)


def read_runs(out: Path) -> dict[Setting, dict[str, Run]]:
    """Every finished run, by setting and method label."""
    runs: dict[Setting, dict[str, Run]] = {}
    for grid in sorted(out.glob("*/grid.json")):
        plan = json.loads(grid.read_text())
        for task in plan["tasks"]:
            for run in task["runs"]:
                folder = grid.parent / run["dir"]
                if not (folder / "summary.json").exists():
                    continue
                runs.setdefault((grid.parent.name, run["seed"]), {})[run["method"]] = Run(
                    _history(folder / "metrics.csv"), read_toml(folder / "config.toml"),
                    run_cost(folder),
                )
    if not runs:
        raise SystemExit(f"{out}: no finished run yet")
    return runs


def keep(out: Path, dest: Path) -> int:
    """Copy the records of every finished run (and each set's grid.json) from `out` to
    `dest`; the number of runs copied."""
    copied = 0
    for grid in sorted(out.glob("*/grid.json")):
        target = dest / grid.parent.name
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(grid, target / "grid.json")
        for task in json.loads(grid.read_text())["tasks"]:
            for run in task["runs"]:
                folder = grid.parent / run["dir"]
                if not (folder / "summary.json").exists():
                    continue
                (target / run["dir"]).mkdir(parents=True, exist_ok=True)
                for name in RECORDS:
                    shutil.copyfile(folder / name, target / run["dir"] / name)
                copied += 1
    return copied


def references(runs: dict[str, Run]) -> dict[str, dict[str, float]]:
    """The frozen base (round 0 of a run) and the copy of the English name, for one setting."""
    from floral.experiment import resolve_config
    from scripts.copy_source import copy_scores

    first = next(iter(runs.values()))
    copy = copy_scores(resolve_config(first.config))["all"]
    round0 = first.history[0]
    return {
        "copy": {"chrf": copy["chrf"], "exact_match": copy["exact_match"]},
        "base": {"chrf": round0["chrf"], "exact_match": round0["exact_match"]},
    }


def _cell(metrics: dict[str, float] | None) -> str:
    if metrics is None:
        return "–"
    return f"{metrics['chrf']:.1f} / {metrics['exact_match']:.1f}"


def _settings(runs: dict[Setting, dict[str, Run]]) -> list[Setting]:
    return sorted(runs)


def headline_table(runs: dict[Setting, dict[str, Run]],
                   refs: dict[Setting, dict[str, dict[str, float]]]) -> str:
    """chrF / exact match (%) at the last round per setting, router ARI, CPU-hours."""
    settings = _settings(runs)
    head = "| method | " + " | ".join(f"{s}, seed {k}" for s, k in settings)
    lines = [head + " | router ARI | CPU-hours |",
             "|---|" + "---:|" * (len(settings) + 2)]
    for key, name in (("copy", "copy the source"), ("base", "frozen base (round 0)")):
        cells = [_cell(refs[s][key]) for s in settings]
        lines.append(f"| {name} | " + " | ".join(cells) + " | | 0 |")
    for label, name in METHODS.items():
        done = [runs[s].get(label) for s in settings]
        if not any(done):
            continue
        cells = [_cell(None if r is None else r.last) for r in done]
        aris = [r.last.get("router_ari", math.nan) for r in done if r is not None]
        ari = " / ".join(f"{a:.2f}" for a in aris) if not all(map(math.isnan, aris)) else ""
        seconds = [r.cpu_seconds for r in done if r is not None]
        hours = (f"{sum(s for s in seconds if s is not None) / 3600:.2f}"
                 + ("+" if None in seconds else ""))  # "+": a run only partly measured
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ari} | {hours} |")
    return "\n".join(lines)


def goal_table(runs: dict[Setting, dict[str, Run]],
               refs: dict[Setting, dict[str, dict[str, float]]]) -> str:
    """Per setting and router: chrF over FedIT, over the copy, below the oracle, and ARI."""
    lines = ["| setting | router | over FedIT | over the copy | below the oracle | router ARI "
             "| goal |", "|---|---|---:|---:|---:|---:|---|"]
    for setting in _settings(runs):
        done = runs[setting]
        for label in (SEEDED, LEARNED):
            if label not in done:
                continue
            chrf = done[label].last["chrf"]
            over_fedit = chrf - done["fedit"].last["chrf"] if "fedit" in done else math.nan
            over_copy = chrf - refs[setting]["copy"]["chrf"]
            below = done[ORACLE].last["chrf"] - chrf if ORACLE in done else math.nan
            ari = done[label].last.get("router_ari", math.nan)
            reached = (over_fedit >= OVER and over_copy >= OVER and below <= WITHIN
                       and ari >= ARI)
            unknown = math.isnan(over_fedit) or math.isnan(below)
            lines.append(
                f"| {setting[0]}, seed {setting[1]} | {METHODS[label]} | {over_fedit:+.1f} | "
                f"{over_copy:+.1f} | {below:+.1f} | {ari:.2f} | "
                f"{'?' if unknown else 'yes' if reached else 'no'} |"
            )
    return "\n".join(lines)


def curve_table(runs: dict[Setting, dict[str, Run]]) -> str:
    """chrF at every evaluated round, per method, the mean over the settings that have it."""
    rounds = sorted({int(h["round"]) for r in _all(runs) for h in r.history})
    lines = ["| method | " + " | ".join(f"round {t}" for t in rounds) + " |",
             "|---|" + "---:|" * len(rounds)]
    for label, name in METHODS.items():
        cells = []
        for t in rounds:
            values = [h["chrf"] for s in runs if label in runs[s]
                      for h in runs[s][label].history if int(h["round"]) == t]
            cells.append(f"{sum(values) / len(values):.1f}" if values else "")
        if any(cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _all(runs: dict[Setting, dict[str, Run]]) -> list[Run]:
    return [run for setting in runs.values() for run in setting.values()]


def figure(runs: dict[Setting, dict[str, Run]],
           refs: dict[Setting, dict[str, dict[str, float]]], folder: Path) -> Path:
    """chrF against the round, one panel per setting, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = _settings(runs)
    fig, axes = plt.subplots(1, len(settings), figsize=(4 * len(settings), 4), sharey=True,
                             squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=True):
        for label, name in METHODS.items():
            run = runs[setting].get(label)
            if run is not None:
                ax.plot([h["round"] for h in run.history], [h["chrf"] for h in run.history],
                        marker="o", markersize=3, label=name)
        ax.axhline(refs[setting]["copy"]["chrf"], color="grey", linestyle="--", linewidth=1,
                   label="copy the source")
        ax.set_title(f"{setting[0]}, seed {setting[1]}", fontsize=9)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("chrF, held-out names")
    axes[0][-1].legend(fontsize=7)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "llm-larger-curves.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder of the grid's language sets")
    parser.add_argument("--figures", type=Path, default=None, help="write the figure here")
    parser.add_argument("--keep", type=Path, default=None,
                        help="copy the finished runs' records here, then print from there")
    args = parser.parse_args()
    out = args.out
    if args.keep is not None:
        print(f"kept the records of {keep(out, args.keep)} runs in {args.keep}")
        out = args.keep
    runs = read_runs(out)
    refs = {setting: references(done) for setting, done in runs.items()}
    print("chrF / exact match (%) at the last round\n")
    print(headline_table(runs, refs))
    print("\nThe goal: at least +10 over FedIT and over the copy, at most 3 below the oracle "
          "router, router ARI at least 0.9\n")
    print(goal_table(runs, refs))
    print("\nchrF per evaluated round (mean over the settings)\n")
    print(curve_table(runs))
    if args.figures is not None:
        print(f"\nwrote {figure(runs, refs, args.figures)}")


if __name__ == "__main__":
    main()
