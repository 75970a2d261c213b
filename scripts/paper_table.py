"""Our sweep's table next to the FLoRAL paper's numbers, in the paper's layout.

    python scripts/paper_table.py results/paper          # the paper-layout table
    python scripts/paper_table.py results/paper --tasks fmnist-rotate,fmnist-label-shift
    python scripts/paper_table.py results/paper --goal   # the router goal, setting by setting
    python scripts/paper_table.py results/paper --cost   # CPU minutes per run, and per grid

Reads `table.csv` of a `floral sweep` folder and prints Markdown: one row per method in the
paper's order, and for every task a column "ours" next to the paper's column for the setting
we share (the reference is ../shared/reference/floral-paper-results.md, the paper's public
outputs). Cells are mean (std) over seeds; a dash where a run is missing or the paper has no
number.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

# Row label, our method spec. The paper's eight rows, then ours.
ROWS = [
    ("FedAvg", "fedavg"),
    ("Local adaptor", "local-adaptor"),
    ("Ensemble", "ensemble"),
    ("Ensemble ✓", "ensemble-oracle"),
    ("FLoRAL(1%)", "floral"),
    ("FLoRAL(1%) ✓", "floral-oracle"),
    ("FLoRAL(10%)", "floral:rank=0.1"),
    ("FLoRAL(10%) ✓", "floral-oracle:rank=0.1"),
    ("**FLoRAL-EM(1%)** (ours)", "floral-em"),
    ("**FLoRAL-EM(10%)** (ours)", "floral-em:rank=0.1"),
    ("**FLoRAL-EM(1%), rank warm-up** (ours)", "floral-em:warmup_rank=0.1"),
]

# The paper's columns we share, by row label.
ROWS_OF = ["FedAvg", "Local adaptor", "Ensemble", "Ensemble ✓", "FLoRAL(1%)", "FLoRAL(1%) ✓",
           "FLoRAL(10%)", "FLoRAL(10%) ✓"]
MNIST_ROT = ["91.5 (.6)", "86.6 (.3)", "92.0 (.1)", "95.8 (.3)", "91.3 (.6)", "93.9 (.8)",
             "91.8 (1.0)", "94.5 (.6)"]
MNIST_LS = ["25.8 (2.4)", "84.5 (1.8)", "93.8 (.5)", "95.6 (.3)", "89.7 (3.2)", "93.7 (.2)",
            "93.1 (.9)", "94.2 (.2)"]
MNIST_ROT_5 = ["78.2 (.6)", "47.4 (5.4)", "66.7 (5.3)", "88.2 (1.4)", "73.1 (3.7)",
               "87.3 (1.5)", "75.7 (2.3)", "87.0 (.7)"]
MNIST_LS_5 = ["23.2 (.9)", "32.0 (2.3)", "86.4 (.4)", "87.6 (1.3)", "46.0 (9.9)", "87.6 (.5)",
              "70.8 (7.1)", "86.9 (.5)"]
# Single runs in the paper's older tables (≈0 printed as 0.0000 there): FedAvg, Local
# adaptor, Ensemble, FLoRAL(1%).
SYNTHETIC_ROWS = ["FedAvg", "Local adaptor", "Ensemble", "FLoRAL(1%)"]

# Our task -> (the paper's column it stands for, that column's numbers by row label).
PAPER = {
    "mnist5k-rotate-5pct": ("MNIST rot 5%", dict(zip(ROWS_OF, MNIST_ROT_5))),
    "mnist5k-label-shift-5pct": ("MNIST LS 5%", dict(zip(ROWS_OF, MNIST_LS_5))),
    "fmnist-rotate": ("MNIST rot", dict(zip(ROWS_OF, MNIST_ROT))),
    "fmnist-label-shift": ("MNIST LS", dict(zip(ROWS_OF, MNIST_LS))),
    "fmnist-rotate-5pct": ("MNIST rot 5%", dict(zip(ROWS_OF, MNIST_ROT_5))),
    "fmnist-label-shift-5pct": ("MNIST LS 5%", dict(zip(ROWS_OF, MNIST_LS_5))),
    "synthetic-linear": (
        "linear (1 run)", dict(zip(SYNTHETIC_ROWS, ["10.50", "3.61", "≈0.0000", "≈0.0000"]))
    ),
    "synthetic-mlp": (
        "MLP (1 run)", dict(zip(SYNTHETIC_ROWS, ["0.612", "0.025", "0.0024", "0.0039"]))
    ),
}

ORDER = list(PAPER)


def cell(row: dict[str, str] | None) -> str:
    if row is None:
        return "—"
    mean, std = float(row["mean"]), float(row["std"])
    seeds = "" if row["seeds"] == "3" else f" [{row['seeds']} seed{'s' * (row['seeds'] != '1')}]"
    if row["metric"] == "accuracy":
        return f"{mean:.1f} ({std:.1f}){seeds}"
    text = f"{mean:.2g} ({std:.1g})" if mean < 1e-3 else f"{mean:.3g} ({std:.2g})"
    return text + seeds


def ari(row: dict[str, str] | None) -> str:
    if row is None or math.isnan(float(row["ari_mean"])):
        return ""
    return f" · ARI {float(row['ari_mean']):.2f}"


# The router goal: learned router within 2 points of the oracle's accuracy, ARI >= 0.9 and a
# spread over seeds <= 2 points, on the Fashion-MNIST and MNIST-5k settings.
GOAL_TASKS = ["fmnist-rotate", "fmnist-label-shift", "fmnist-rotate-5pct",
              "fmnist-label-shift-5pct", "mnist5k-rotate-5pct", "mnist5k-label-shift-5pct"]
GOAL_PAIRS = [  # (learned router, its oracle)
    ("floral", "floral-oracle"),
    ("floral-em", "floral-oracle"),
    ("floral:rank=0.1", "floral-oracle:rank=0.1"),
    ("floral-em:rank=0.1", "floral-oracle:rank=0.1"),
    ("floral-em:warmup_rank=0.1", "floral-oracle"),
]


def goal_table(ours: dict[tuple[str, str], dict[str, str]]) -> list[str]:
    lines = ["| setting | learned router | accuracy | oracle | gap | ARI | spread | goal |",
             "|---|---|---|---|---|---|---|---|"]
    for task in GOAL_TASKS:
        for learned, oracle in GOAL_PAIRS:
            row, bar = ours.get((task, learned)), ours.get((task, oracle))
            if row is None or bar is None:
                continue
            mean, std = float(row["mean"]), float(row["std"])
            gap = mean - float(bar["mean"])
            score = float(row["ari_mean"])
            met = gap >= -2 and score >= 0.9 and std <= 2
            verdict = "met" if met else "**not met**"
            if row["seeds"] != "3" or bar["seeds"] != "3":
                verdict += f" ({row['seeds']} / {bar['seeds']} seeds)"
            lines.append(
                f"| {task} | {learned} | {mean:.1f} | {float(bar['mean']):.1f} | {gap:+.1f} "
                f"| {score:.2f} | {std:.1f} | {verdict} |"
            )
    return lines


def measured_tasks(ours: dict[tuple[str, str], dict[str, str]]) -> list[str]:
    """The tasks the folder has runs of, in the paper's order."""
    return [t for t in ORDER if any(task == t for task, _ in ours)]


def cost_table(ours: dict[tuple[str, str], dict[str, str]]) -> list[str]:
    """CPU minutes per run (wall time where a run predates CPU timing), and what the task's
    full grid (every row, 3 seeds) costs."""
    tasks = measured_tasks(ours)
    lines = ["| method | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    totals = dict.fromkeys(tasks, 0.0)
    for label, spec in ROWS:
        cells = []
        for task in tasks:
            row = ours.get((task, spec))
            if row is None:
                cells.append("—")
                continue
            cpu, wall = float(row["cpu_seconds_per_run"]), float(row["seconds_per_run"])
            minutes = (wall if math.isnan(cpu) else cpu) / 60
            totals[task] += 3 * minutes
            cells.append(f"{minutes:.1f}" + (" (wall)" if math.isnan(cpu) else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| **the rows above, 3 seeds (CPU hours)** | "
                 + " | ".join(f"{totals[t] / 60:.1f}" for t in tasks) + " |")
    return lines


def main() -> None:
    folder = Path(sys.argv[1])
    with open(folder / "table.csv") as f:
        ours = {(r["task"], r["method"]): r for r in csv.DictReader(f)}
    if "--goal" in sys.argv:
        print("\n".join(goal_table(ours)))
        return
    if "--cost" in sys.argv:
        print("\n".join(cost_table(ours)))
        return
    tasks = measured_tasks(ours)
    if "--tasks" in sys.argv:
        wanted = sys.argv[sys.argv.index("--tasks") + 1].split(",")
        tasks = [t for t in tasks if t in wanted]
    header = ["method"]
    for task in tasks:
        header += [f"{task} (ours)", f"{PAPER[task][0]} (paper)"]
    print("| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")
    for label, spec in ROWS:
        cells = [label]
        for task in tasks:
            row = ours.get((task, spec))
            cells += [cell(row) + ari(row), PAPER[task][1].get(label, "—")]
        if any(c != "—" for c in cells[1:]):  # a row neither we nor the paper ran is left out
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
