"""A grid of experiments: tasks (experiment files) x methods x seeds, resumable, on all cores.

    floral sweep configs/synthetic-linear.toml configs/mnist5k-label-shift-5pct.toml \\
        --methods fedavg,floral,floral-oracle --seeds 0,1,2

Every (task, method, seed) is an ordinary experiment with its own results folder,
`<out>/<task>/<method>/seed<k>/`, planned and run by `floral.compare`'s pieces: every config is
resolved (and so checked) before any run starts; a folder that holds a finished run of the
same config is not run again; an interrupted run resumes from its checkpoint (written every
`engine.checkpoint_every` rounds, and on Ctrl-C); `jobs` runs go at once, one thread each.

What it writes, from whatever runs have finished (`floral plot` writes it again):
- per task: `comparison.md` / `.csv`, and the figures `curves.png` (metric against rounds),
  `router_ari.png` (cluster recovery against rounds), `router_heatmap.png` (each learned
  router's final pi, clients sorted by true cluster) and `clusters.png` (metric per cluster);
- for the grid: `table.md` / `table.csv` in the FLoRAL paper's layout (methods as rows, tasks
  as columns, each cell mean (std) over seeds), with the router ARI and the time per run;
- `grid.json`: the plan (tasks, methods, seeds, folders) that `floral plot` reads back.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from floral.checkpoint import atomic_write_text, make_folder, read_json, read_toml
from floral.compare import (
    MethodSpec,
    Progress,
    RunSpec,
    finished_summary,
    load_base,
    load_summary,
    parse_method_specs,
    plan_runs,
    run_all,
    run_cost,
)
from floral.errors import ConfigError
from floral.experiment import RunSummary, check_name, resolve_config
from floral.plots import plot_cluster_bars, plot_router_heatmap, router_weights_of_run
from floral.report import (
    ComparisonRow,
    comparison_rows,
    headline_of,
    plot_curves,
    write_comparison,
)
from floral.train.headline import PERCENT_SCALE, metric_label

__all__ = [
    "TaskPlan",
    "TaskResults",
    "collect",
    "format_grid_cell",
    "load_grid",
    "plan_sweep",
    "run_sweep",
    "write_grid_table",
    "write_manifest",
    "write_reports",
]


@dataclass(frozen=True)
class TaskPlan:
    """The runs of one task (experiment file): methods x seeds, in one folder."""

    name: str
    source: str
    out: Path
    runs: tuple[RunSpec, ...]


@dataclass
class TaskResults:
    """The finished runs of one task, grouped by method label in the plan's order."""

    name: str
    out: Path
    summaries: dict[str, list[RunSummary]]
    folders: dict[str, list[Path]]


def plan_sweep(
    configs: Sequence[str | os.PathLike],
    methods: Sequence[MethodSpec],
    seeds: Sequence[int],
    out: Path,
    overrides: Sequence[str] = (),
    flat: bool = False,
) -> list[TaskPlan]:
    """Every run of the grid, resolved before any starts; `flat` puts a single task's method
    folders directly in `out` (the layout of `floral compare`)."""
    if flat and len(configs) != 1:
        raise ConfigError(f"a flat results folder holds one task, got {len(configs)}")
    tasks: list[TaskPlan] = []
    for path in configs:
        base = load_base(path)
        name = base["name"]
        check_name(name, f"{path}: name")  # the task's folder, whatever --set makes of the runs'
        if any(task.name == name for task in tasks):
            raise ConfigError(f"{path}: a second task named {name!r}; give each file its own name")
        folder = out if flat else out / name
        runs = plan_runs(base, methods, seeds, folder, overrides)
        tasks.append(TaskPlan(name, str(path), folder, tuple(runs)))
    return tasks


def run_sweep(
    tasks: Sequence[TaskPlan], jobs: int, on_progress: Progress | None = None
) -> dict[str, RunSummary]:
    """Run (or skip, or resume) every run of every task, `jobs` at a time, by run key."""
    return run_all([run for task in tasks for run in task.runs], jobs, on_progress)


def write_manifest(
    tasks: Sequence[TaskPlan], methods: Sequence[MethodSpec], seeds: Sequence[int], out: Path
) -> Path:
    """`grid.json`: the plan, with folders relative to `out`, for `floral plot`.

    Merged with the folder's earlier plans, so that a grid grown by later sweeps (another
    method, another seed) is reported whole.
    """
    data = {
        "methods": [m.label for m in methods],
        "seeds": list(seeds),
        "tasks": [
            {
                "name": task.name,
                "source": task.source,
                "dir": _relative(task.out, out),
                "runs": [
                    {"method": r.method.label, "seed": r.seed, "dir": _relative(r.out_dir, out)}
                    for r in task.runs
                ],
            }
            for task in tasks
        ],
    }
    path = out / "grid.json"
    if path.exists():
        data = _merge_plans(read_json(path), data)
    make_folder(out)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return path


def _merge_plans(old: dict, new: dict) -> dict:
    tasks = {task["name"]: task for task in old["tasks"]}
    for task in new["tasks"]:
        before = tasks.get(task["name"], {"runs": []})["runs"]
        runs = {run["dir"]: run for run in [*before, *task["runs"]]}
        tasks[task["name"]] = {**task, "runs": list(runs.values())}
    return {
        "methods": list(dict.fromkeys([*old["methods"], *new["methods"]])),
        "seeds": sorted({*old["seeds"], *new["seeds"]}),
        "tasks": list(tasks.values()),
    }


def _relative(path: Path, root: Path) -> str:
    return os.path.relpath(path, root)


def collect(tasks: Sequence[TaskPlan], methods: Sequence[MethodSpec]) -> list[TaskResults]:
    """The finished runs of every task (unfinished ones are left out), grouped by method."""
    results = []
    for task in tasks:
        summaries: dict[str, list[RunSummary]] = {}
        folders: dict[str, list[Path]] = {}
        for method in methods:
            for run in (r for r in task.runs if r.method == method):
                done = finished_summary(run)
                if done is not None:
                    summaries.setdefault(method.label, []).append(done)
                    folders.setdefault(method.label, []).append(run.out_dir)
        results.append(TaskResults(task.name, task.out, summaries, folders))
    return results


def load_grid(out: Path) -> tuple[list[TaskPlan], list[MethodSpec], list[int]]:
    """The plan `grid.json` in `out` describes, with each run's saved config."""
    manifest = out / "grid.json"
    if not manifest.exists():
        raise ConfigError(f"{out}: no grid.json; give a folder written by floral sweep or compare")
    data = read_json(manifest)
    try:
        methods = {label: _label_spec(label) for label in data["methods"]}
        tasks = []
        for task in data["tasks"]:
            runs = []
            for run in task["runs"]:
                folder = out / run["dir"]
                config_path = folder / "config.toml"
                if not config_path.exists():
                    continue  # planned, never started
                config = resolve_config(read_toml(config_path))
                runs.append(RunSpec(methods[run["method"]], run["seed"], config, folder))
            tasks.append(TaskPlan(task["name"], task["source"], out / task["dir"], tuple(runs)))
        return tasks, list(methods.values()), list(data["seeds"])
    except (KeyError, TypeError) as error:
        raise ConfigError(f"{manifest}: not a grid written by floral ({error!r} missing)") from None


def _label_spec(label: str) -> MethodSpec:
    (spec,) = parse_method_specs(label)
    return spec


# -- reports --------------------------------------------------------------------------------
def write_reports(results: Sequence[TaskResults], out: Path, plots: bool = True) -> list[Path]:
    """Per task: comparison table and figures; for several tasks, the grid table too."""
    written: list[Path] = []
    for task in results:
        if not task.summaries:
            continue
        title = f"{task.name}: {_seed_counts(task)}"
        written.extend(write_comparison(comparison_rows(task.summaries), task.out, title))
        if plots:
            written.extend(_task_figures(task, title))
    if len(results) > 1:
        written.extend(write_grid_table(results, out))
    return written


def write_run_figures(run: Path) -> list[Path]:
    """The figures of one run's results folder (`floral plot RUN`): its curves, router ARI,
    final pi per client and per-cluster metric, beside its metrics.csv."""
    summary = load_summary(run)
    label = summary.method  # the figures name the seed where they show one
    task = TaskResults(summary.name, run, {label: [summary]}, {label: [run]})
    return _task_figures(task, f"{summary.name}: {label}, seed {summary.seed}")


def _seed_counts(task: TaskResults) -> str:
    counts = sorted({len(s) for s in task.summaries.values()})
    return f"{'-'.join(str(c) for c in counts)} seed(s)"


def _task_figures(task: TaskResults, title: str) -> list[Path]:
    maps = {}
    for label, folders in task.folders.items():
        # The first seed whose final state is there: a kept record may have dropped it.
        kept = [
            (folder, summary)
            for folder, summary in zip(folders, task.summaries[label], strict=True)
            if (folder / "state.safetensors").exists()
        ]
        router = router_weights_of_run(kept[0][0]) if kept else None
        if router is not None:
            maps[f"{label} (seed {kept[0][1].seed})"] = router
    figures = [
        plot_curves(task.summaries, task.out / "curves.png", title),
        plot_curves(task.summaries, task.out / "router_ari.png", title, key="router_ari"),
        plot_router_heatmap(maps, task.out / "router_heatmap.png", f"{task.name}: final π"),
        plot_cluster_bars(task.summaries, task.out / "clusters.png", f"{title}, per cluster"),
    ]
    return [f for f in figures if f is not None]


def format_grid_cell(mean: float, std: float, metric: str) -> str:
    """The paper's cell: mean (std); accuracy, chrF and exact match to 0.1 point, MSE and
    perplexity to 3 significant digits."""
    if math.isnan(mean):
        return "—"
    if metric in PERCENT_SCALE:
        return f"{mean:.1f} ({std:.1f})"
    return f"{mean:.3g} ({std:.2g})"


def write_grid_table(results: Sequence[TaskResults], out: Path) -> list[Path]:
    """`table.md` (three tables: metric, router ARI, seconds per run) and `table.csv`."""
    rows = {
        task.name: {r["method"]: r for r in comparison_rows(task.summaries)}
        for task in results
        if task.summaries
    }
    methods = list(dict.fromkeys(label for by in rows.values() for label in by))
    tasks = list(rows)
    for task in results:
        for label, folders in task.folders.items():
            if label in rows.get(task.name, {}):
                rows[task.name][label]["cpu_seconds_per_run"] = _mean_cost(folders)
    # The lead metric (chrF where the clients generate text), then the other headline
    # metrics of the tasks that have them (exact match, perplexity).
    more = list(dict.fromkeys(
        m for by in rows.values() for r in by.values() for m in headline_of(r)[1:]
    ))
    sections = [
        ("Final test metric (chrF where the clients generate text), mean (std) over seeds",
         _metric_cell),
        *((f"Final {metric_label(m)}, mean (std) over seeds", _headline_cell(m)) for m in more),
        ("Router cluster recovery (ARI), mean (std) over seeds", _ari_cell),
        (
            "CPU seconds per run (one thread: data, training, evaluation), mean over seeds",
            _seconds_cell,
        ),
    ]
    lines = []
    for heading, cell in sections:
        lines += [
            f"## {heading}",
            "",
            "| method | " + " | ".join(tasks) + " |",
            "|---" * (len(tasks) + 1) + "|",
        ]
        for label in methods:
            cells = [cell(rows[t].get(label)) for t in tasks]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    md = out / "table.md"
    atomic_write_text(md, "\n".join(lines))
    path = out / "table.csv"
    flat = [{"task": t, **rows[t][m]} for t in tasks for m in methods if m in rows[t]]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for r in flat for k in r)),
                            restval="")
    writer.writeheader()
    writer.writerows(flat)
    atomic_write_text(path, text.getvalue())
    return [md, path]


def _metric_cell(row: ComparisonRow | None) -> str:
    return "" if row is None else format_grid_cell(row["mean"], row["std"], row["metric"])


def _headline_cell(metric: str) -> Callable[[ComparisonRow | None], str]:
    def cell(row: ComparisonRow | None) -> str:
        if row is None or f"{metric}_mean" not in row:
            return ""
        return format_grid_cell(row[f"{metric}_mean"], row[f"{metric}_std"], metric)

    return cell


def _ari_cell(row: ComparisonRow | None) -> str:
    if row is None:
        return ""
    if math.isnan(row["ari_mean"]):
        return "—"
    return f"{row['ari_mean']:.2f} ({row['ari_std']:.2f})"


def _mean_cost(folders: Sequence[Path]) -> float:
    costs = [c for c in map(run_cost, folders) if c is not None]
    return sum(costs) / len(costs) if costs else math.nan


def _seconds_cell(row: ComparisonRow | None) -> str:
    if row is None:
        return ""
    cpu = row.get("cpu_seconds_per_run", math.nan)
    # Runs measured before cost.json existed, or resumed: their wall time, marked.
    return f"{row['seconds_per_run']:.0f} (wall)" if math.isnan(cpu) else f"{cpu:.0f}"
