"""The table and figures of docs/llm-family.md, from a finished (or partly finished) grid.

    python scripts/llm_family.py results/llm-family              # the table, at the last round
    python scripts/llm_family.py results/llm-family --round 4    # at round 4
    python scripts/llm_family.py results/llm-family --figures docs   # and the two figures

It reads what `floral sweep` wrote: `grid.json`, and per run `metrics.csv`, `summary.json`,
`config.toml` and `cost.json`. Each row is a method (the mean over the seeds that finished;
with two or more, "± std" follows the chrF). Two rows need no training: the frozen base is
round 0 of each seed's first run (every adaptor starts at B = 0), and "copy the source"
answers every held-out prompt with the English string itself; both are means over the seeds,
whose held-out names differ.

Bytes are per client and round: a run's total divided by the client-rounds it trained.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from floral.checkpoint import read_toml

if not __package__:  # run as a file: the repository root makes scripts.copy_source importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Readable names for the grid's method labels (anything else is shown as its label).
NAMES = {
    "fedit": "FedIT",
    "local-adaptor:train_base=false": "local adaptor (no federation)",
    "floral": "FLoRAL (learned router)",
    "floral-oracle:train_base=false": "FLoRAL, oracle router",
    "floral-em:train_base=false": "floral-em (hard EM router)",
    "floral-seeded:train_base=false": "floral-seeded (seeded router)",
    "ffa-lora": "FFA-LoRA",
    "fedsa-lora": "FedSA-LoRA",
    "fdlora": "FDLoRA",
    "flasc:comm.upload=topk:0.25": "FLASC, upload 1/4",
    "flasc:comm.upload=topk:0.0625": "FLASC, upload 1/16",
    "flasc:comm.upload=topk:0.25:comm.download=topk:0.25": "FLASC, up and down 1/4",
    "fedit:comm.upload=quant:8:comm.download=quant:8": "FLoCoRA-style, 8 bits",
    "fedit:comm.upload=quant:4:comm.download=quant:4": "FLoCoRA-style, 4 bits",
    "fedit:comm.upload=quant:2:comm.download=quant:2": "FLoCoRA-style, 2 bits",
    "hetlora:rank_tiers=[2,4,8]": "HetLoRA, ranks 2/4/8",
    "flora:rank_tiers=[2,4,8]": "FLoRA, ranks 2/4/8",
    'pfedlora:model.depths=[30,20,10]:method.include=["*.layers.[0-9].*_proj"]:model_lr=0.00002': (
        "pFedLoRA, depths 30/20/10"
    ),
    "floral:train.router_lr=0.5": "FLoRAL, router lr 0.5",
    "floral:train.rounds=12": "FLoRAL, 12 rounds",
    "floral:task.num_clients=16": "FLoRAL, 16 clients (4 per language)",
    "floral-seeded:train_base=false:task.num_clients=16": "floral-seeded, 16 clients",
    "floral-em:train_base=false:warmup_rank=32:warmup_rounds=2": "floral-em, rank-32 warm-up",
    "floral-em:train_base=false:holdout=0.25": "floral-em, E-step on held-out 1/4",
}

# FLoRAL's ablations: rows of the table, left out of the figures, where they would crowd the
# main comparison (they all send what FLoRAL sends).
ABLATIONS = {
    "floral:train.router_lr=0.5",
    "floral:train.rounds=12",
    "floral:task.num_clients=16",
    "floral-seeded:train_base=false:task.num_clients=16",
    "floral-em:train_base=false:warmup_rank=32:warmup_rounds=2",
    "floral-em:train_base=false:holdout=0.25",
}


@dataclass
class Row:
    label: str
    name: str
    chrf: list[float]  # one per seed
    exact: list[float]
    languages: dict[str, list[float]]  # chrF per language, one per seed
    exact_languages: dict[str, list[float]]  # exact match (%) per language, one per seed
    ari: list[float]
    up: list[float]  # bytes per client-round
    down: list[float]
    train_seconds: list[float]  # per round, wall
    cpu_seconds: list[float]  # whole run
    peak_mb: list[float]


def read_rows(out: Path, round_: int | None) -> tuple[list[Row], dict[int, dict], list[str]]:
    """The rows, and per seed the config and round-0 metrics of its first finished run."""
    grid = json.loads((out / "grid.json").read_text())
    rows: dict[str, Row] = {}
    seeds: dict[int, dict] = {}
    languages: list[str] = []
    for task in grid["tasks"]:
        for run in task["runs"]:
            folder = out / run["dir"]
            if not (folder / "summary.json").exists():
                continue  # not finished
            config = read_toml(folder / "config.toml")
            languages = config["task"]["languages"]
            history = _history(folder / "metrics.csv")
            at = history[-1] if round_ is None else _at_round(history, round_, folder)
            seeds.setdefault(run["seed"], {"config": config, "round0": history[0]})
            label = run["method"]
            row = rows.setdefault(
                label, Row(label, NAMES.get(label, label), [], [], {}, {}, [], [], [], [], [], [])
            )
            row.chrf.append(at["chrf"])
            row.exact.append(at["exact_match"])
            for c, language in enumerate(languages):
                row.languages.setdefault(language, []).append(at[f"chrf_cluster{c}"])
                row.exact_languages.setdefault(language, []).append(
                    at[f"exact_match_cluster{c}"]
                )
            if not math.isnan(at.get("router_ari", math.nan)):
                row.ari.append(at["router_ari"])
            summary = json.loads((folder / "summary.json").read_text())
            client_rounds = _client_rounds(config, summary["rounds"])
            row.up.append(summary["bytes_up"] / client_rounds)
            row.down.append(summary["bytes_down"] / client_rounds)
            row.train_seconds.append(summary["seconds_per_round"])
            cost = folder / "cost.json"
            if cost.exists():
                data = json.loads(cost.read_text())
                if not data.get("resumed"):
                    row.cpu_seconds.append(data["cpu_seconds"])
                if data.get("peak_memory_mb") is not None:
                    row.peak_mb.append(data["peak_memory_mb"])
    if not seeds:
        raise SystemExit(f"{out}: no finished run yet")
    ordered = [rows[m] for m in grid["methods"] if m in rows]
    return ordered, seeds, languages


def _history(path: Path) -> list[dict[str, float]]:
    with open(path) as f:
        return [{k: float(v) if v else math.nan for k, v in r.items()} for r in csv.DictReader(f)]


def _at_round(history: list[dict[str, float]], round_: int, folder: Path) -> dict[str, float]:
    for row in history:
        if int(row["round"]) == round_:
            return row
    raise SystemExit(f"{folder}: no evaluation at round {round_}")


def _client_rounds(config: dict, rounds: int) -> float:
    from floral.engines.driver import sample_clients

    fraction = config["train"].get("clients_per_round", 1.0)
    return len(sample_clients(0, 1, config["task"]["num_clients"], fraction)) * rounds


def reference_rows(seeds: dict[int, dict], languages: list[str]) -> dict[str, dict[str, float]]:
    """The frozen base and the copy of the English string: chrF, exact match, and both per
    language ("exact <lang>"), each the mean over the seeds ("seeds": how many)."""
    from floral.experiment import resolve_config
    from scripts.copy_source import copy_scores

    base: list[dict[str, float]] = []
    copy: list[dict[str, float]] = []
    for seed in seeds.values():
        round0 = seed["round0"]
        base.append(
            {"chrf": round0["chrf"], "exact": round0["exact_match"]}
            | {lang: round0[f"chrf_cluster{c}"] for c, lang in enumerate(languages)}
            | {f"exact {lang}": round0[f"exact_match_cluster{c}"]
               for c, lang in enumerate(languages)}
        )
        scores = copy_scores(resolve_config(seed["config"]))
        copy.append(
            {"chrf": scores["all"]["chrf"], "exact": scores["all"]["exact_match"]}
            | {lang: scores[lang]["chrf"] for lang in languages}
            | {f"exact {lang}": scores[lang]["exact_match"] for lang in languages}
        )
    return {
        name: {key: _mean([r[key] for r in runs]) for key in runs[0]} | {"seeds": len(runs)}
        for name, runs in (("base", base), ("copy", copy))
    }


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def _chrf_cell(values: list[float]) -> str:
    if len(values) > 1:
        return f"{_mean(values):.1f} ± {statistics.stdev(values):.1f}"
    return f"{_mean(values):.1f}"


def _num(value: float, digits: int = 1) -> str:
    return "" if math.isnan(value) else f"{value:.{digits}f}"


def _megabytes(value: float) -> str:
    return f"{value / 1e6:.3g}"


def table(rows: list[Row], references: dict[str, dict[str, float]], languages: list[str]) -> str:
    head = (
        "| method | seeds | chrF | "
        + " | ".join(f"chrF {lang}" for lang in languages)
        + " | exact % | router ARI | MB up | MB down | train s/round | CPU s/run | peak GB |"
    )
    lines = [head, "|" + "---|" * 2 + "---:|" * (len(languages) + 8)]
    for name, key in (("frozen base (round 0)", "base"), ("copy the English string", "copy")):
        ref = references[key]
        lines.append(
            f"| {name} | {ref['seeds']:.0f} | {_num(ref['chrf'])} | "
            + " | ".join(_num(ref[lang]) for lang in languages)
            + f" | {_num(ref['exact'])} | | 0 | 0 | | | |"
        )
    for row in rows:
        cells = [
            row.name,
            str(len(row.chrf)),
            _chrf_cell(row.chrf),
            *(_num(_mean(row.languages[lang])) for lang in languages),
            _num(_mean(row.exact)),
            _num(_mean(row.ari), 2),
            _megabytes(_mean(row.up)),
            _megabytes(_mean(row.down)),
            _num(_mean(row.train_seconds)),
            _num(_mean(row.cpu_seconds), 0),
            _num(_mean(row.peak_mb) / 1024, 2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def exact_table(
    rows: list[Row], references: dict[str, dict[str, float]], languages: list[str]
) -> str:
    """Exact match (%) overall and per language, the mean over the seeds."""
    columns = " | ".join(f"exact {lang}" for lang in languages)
    head = f"| method | seeds | exact % | {columns} |"
    lines = [head, "|" + "---|" * 2 + "---:|" * (len(languages) + 1)]
    for name, key in (("frozen base (round 0)", "base"), ("copy the English string", "copy")):
        ref = references[key]
        lines.append(
            f"| {name} | {ref['seeds']:.0f} | {_num(ref['exact'])} | "
            + " | ".join(_num(ref[f"exact {lang}"]) for lang in languages) + " |"
        )
    for row in rows:
        cells = [
            row.name,
            str(len(row.exact)),
            _num(_mean(row.exact)),
            *(_num(_mean(row.exact_languages[lang])) for lang in languages),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figures(
    rows: list[Row], references: dict[str, dict[str, float]], languages: list[str], folder: Path
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    rows = [row for row in rows if row.label not in ABLATIONS]
    copy_chrf, base_chrf = references["copy"]["chrf"], references["base"]["chrf"]
    # chrF against upload bytes: a method that uploads nothing sits at the left edge.
    sent = [_mean(r.up) for r in rows if _mean(r.up) > 0]
    floor = min(sent) / 4 if sent else 1.0
    fig, ax = plt.subplots(figsize=(8, 5.5))
    placed: list[tuple[float, float]] = []
    for row in sorted(rows, key=lambda r: -_mean(r.chrf)):
        up = _mean(row.up)
        x, y = (up if up > 0 else floor), _mean(row.chrf)
        ax.scatter([x], [y], s=36, marker="o" if up > 0 else "s")
        # A label near one already written goes one line lower, so close points stay legible.
        near = sum(abs(math.log10(x / px)) < 0.6 and abs(y - py) < 1.5 for px, py in placed)
        placed.append((x, y))
        ax.annotate(
            row.name, (x, y), fontsize=7, xytext=(4, 3 - 9 * near), textcoords="offset points"
        )
    ax.axhline(copy_chrf, color="grey", linestyle="--", linewidth=1)
    ax.text(floor, copy_chrf + 0.4, "copy the English string", fontsize=7, color="grey")
    ax.axhline(base_chrf, color="grey", linestyle=":", linewidth=1)
    ax.text(floor, base_chrf + 0.4, "frozen base", fontsize=7, color="grey")
    ax.set_xscale("log")
    ax.set_xlim(floor / 2, max(sent, default=floor) * 8)  # room for the labels on the right
    ax.set_xlabel("bytes uploaded per client and round (log; squares: nothing uploaded)")
    ax.set_ylabel("chrF, held-out names (all languages)")
    ax.set_title("SmolLM2-135M, 8 clients, 4 languages: chrF against upload")
    ax.grid(alpha=0.3)
    bytes_path = folder / "llm-family-bytes.png"
    fig.tight_layout()
    fig.savefig(bytes_path, dpi=120)
    plt.close(fig)
    # chrF per language per method: grouped bars.
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.8 / len(languages)
    positions = range(len(rows))
    for i, language in enumerate(languages):
        ax.bar(
            [p + i * width for p in positions],
            [_mean(r.languages[language]) for r in rows],
            width,
            label=language,
        )
    ax.axhline(copy_chrf, color="grey", linestyle="--", linewidth=1, label="copy the source")
    ax.set_xticks([p + width * (len(languages) - 1) / 2 for p in positions])
    ax.set_xticklabels([r.name for r in rows], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("chrF")
    ax.set_title("chrF per target language")
    ax.legend(fontsize=7, ncol=len(languages) + 1)
    ax.grid(axis="y", alpha=0.3)
    languages_path = folder / "llm-family-languages.png"
    fig.tight_layout()
    fig.savefig(languages_path, dpi=120)
    plt.close(fig)
    return [bytes_path, languages_path]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder floral sweep wrote")
    parser.add_argument("--round", type=int, default=None, help="default: the last")
    parser.add_argument("--figures", type=Path, default=None, help="write the figures here")
    parser.add_argument("--exact", action="store_true",
                        help="print exact match per language instead of the main table")
    args = parser.parse_args()
    rows, seeds, languages = read_rows(args.out, args.round)
    references = reference_rows(seeds, languages)  # builds each seed's task: once
    print((exact_table if args.exact else table)(rows, references, languages))
    if args.figures is not None:
        for path in figures(rows, references, languages, args.figures):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
