"""The `floral` command: run an experiment, compare methods, sweep a grid, plot, list methods."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

from floral.errors import FloralError, OutputError

# The eight rows of the FLoRAL paper's tables (arXiv 2410.03497), in its order: the default
# grid of `floral sweep`.
PAPER_METHODS = (
    "fedavg,local-adaptor,ensemble,ensemble-oracle,"
    "floral,floral-oracle,floral:rank=0.1,floral-oracle:rank=0.1"
)

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except FloralError as error:
        print(f"floral: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("floral: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="floral", description="Federated, personalized low-rank adaptation."
    )
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run one experiment (a TOML file)")
    run.add_argument("config", help="experiment file, e.g. configs/mnist5k-label-shift.toml")
    _add_common(run)
    run.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    run.add_argument(
        "--overwrite", action="store_true",
        help="replace the run already in the results folder (otherwise an error)",
    )
    run.add_argument(
        "--engine",
        choices=("local", "flower"),
        help="run on this engine (default: the config's engine.name); "
        "flower = a Flower simulation, needs pip install 'floral-lora[flower]'",
    )
    run.set_defaults(handler=_cmd_run)

    compare = sub.add_parser("compare", help="several methods x seeds on one task, as a table")
    compare.add_argument("config")
    _add_grid(compare, methods="floral,fedavg,local-adaptor", seeds="0", checkpoint_every=0)
    compare.set_defaults(handler=_cmd_compare)

    sweep = sub.add_parser(
        "sweep", help="a grid of tasks x methods x seeds: resumable, on all cores, one table"
    )
    sweep.add_argument("configs", nargs="+", help="experiment files, one task each")
    _add_grid(sweep, methods=PAPER_METHODS, seeds="0,1,2", checkpoint_every=50)
    sweep.set_defaults(handler=_cmd_sweep)

    plot = sub.add_parser(
        "plot", help="tables and figures again from a sweep or compare folder (finished runs)"
    )
    plot.add_argument("results", help="a folder written by floral sweep or compare, or one run's")
    plot.set_defaults(handler=_cmd_plot)

    generate = sub.add_parser(
        "generate", help="what one client's model of a finished run answers to a prompt"
    )
    generate.add_argument("run", help="a results folder (translations or jsonl task)")
    generate.add_argument("--client", type=int, required=True, help="the client's number")
    generate.add_argument("--system", metavar="TEXT",
                          help="a system message before each prompt (default: task.system)")
    generate.add_argument("prompts", nargs="+", metavar="PROMPT",
                          help="a prompt (translations: the English string to translate)")
    generate.set_defaults(handler=_cmd_generate)

    export = sub.add_parser(
        "export", help="a finished language-model run's adaptors as PEFT LoRA folders"
    )
    export.add_argument("run", help="a results folder")
    export.add_argument("out", help="where client-<k>/ (and shared/adaptor-<c>/) go")
    export.add_argument("--client", type=int, action="append", metavar="K",
                        help="only client K (repeatable; default: every client)")
    export.set_defaults(handler=_cmd_export)

    methods = sub.add_parser("methods", help="list the methods with a one-line description")
    methods.set_defaults(handler=_cmd_methods)
    return parser


def _add_grid(
    parser: argparse.ArgumentParser, methods: str, seeds: str, checkpoint_every: int
) -> None:
    parser.add_argument(
        "--methods",
        default=methods,
        help="comma-separated; options as name:key=value[:key=value...], e.g. "
        "floral:rank=0.1 or floral-em:warmup_rank=0.1:warmup_rounds=100 "
        f"(default: {methods})",
    )
    parser.add_argument("--seeds", default=seeds, help=f"comma-separated (default: {seeds})")
    parser.add_argument(
        "--jobs", type=int, default=0, help="runs in parallel (default: one per core)"
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=checkpoint_every,
        metavar="N",
        help="checkpoint each run every N rounds, so a killed grid resumes mid-run "
        f"(default: {checkpoint_every or 'the config'})",
    )
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    _add_common(parser)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set train.rounds=50 (repeatable)",
    )
    parser.add_argument("--out", help="results folder (default: results/<name>)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress (a bar on a terminal, else a line every 30 s)")


def _cmd_run(args: argparse.Namespace) -> int:
    from floral.checkpoint import check_writable
    from floral.experiment import load_config
    from floral.progress import RunProgress, print_summary
    from floral.run import run_experiment

    overrides = [*args.set, f"engine.name={args.engine}"] if args.engine else args.set
    config = load_config(args.config, overrides)
    out = Path(args.out or config.output.dir or Path("results") / config.name)
    check_writable(out)  # before the progress bar shows
    try:
        with RunProgress(config, disable=args.quiet, resumed=args.resume) as progress:
            summary = run_experiment(
                config, out, resume=args.resume, overwrite=args.overwrite,
                on_round=progress.update, on_client=progress.on_client,
            )
    except OutputError as error:
        raise OutputError(f"{error}{_resumable_from(out)}") from None
    print_summary(summary)
    return 0


def _resumable_from(out: Path) -> str:
    """What a run stopped by a failed write left to continue from, in words."""
    from floral.checkpoint import Checkpoint

    checkpoint = Checkpoint(out / "checkpoint")
    try:
        round_ = checkpoint.round() if checkpoint.exists() else None
    except FloralError:
        return ""
    if round_ is None:
        return ""
    return (f"; the checkpoint of round {round_} in {checkpoint.folder} is intact: "
            "rerun with --resume once the problem is fixed")


def _cmd_compare(args: argparse.Namespace) -> int:
    from floral.compare import load_base

    out = Path(args.out or Path("results") / f"{load_base(args.config)['name']}-compare")
    return _run_grid([args.config], args, out, flat=True)


def _cmd_sweep(args: argparse.Namespace) -> int:
    return _run_grid(args.configs, args, Path(args.out or "results/sweep"), flat=False)


def _run_grid(configs: Sequence[str], args: argparse.Namespace, out: Path, flat: bool) -> int:
    import os

    from floral.compare import parse_method_specs
    from floral.progress import GridProgress
    from floral.sweep import plan_sweep, run_sweep, write_manifest

    methods = parse_method_specs(args.methods)
    seeds = _parse_seeds(args.seeds)
    overrides = list(args.set)
    if args.checkpoint_every:
        overrides.append(f"engine.checkpoint_every={args.checkpoint_every}")
    tasks = plan_sweep(configs, methods, seeds, out, overrides, flat=flat)
    write_manifest(tasks, methods, seeds, out)
    runs = [run for task in tasks for run in task.runs]
    jobs = args.jobs or min(os.cpu_count() or 1, len(runs))
    try:
        with GridProgress(runs, disable=args.quiet) as progress:
            run_sweep(tasks, jobs, progress.update)
    except FloralError:
        with contextlib.suppress(OutputError):  # a full disk: the run's error is the one to tell
            _report(out, plots=not args.no_plots)  # the runs that did finish, then the error
        raise
    return _report(out, plots=not args.no_plots)


def _cmd_plot(args: argparse.Namespace) -> int:
    out = Path(args.results)
    if not (out / "grid.json").is_file() and (out / "summary.json").is_file():
        return _run_figures(out)  # one run's results folder
    return _report(out, plots=True)


def _run_figures(run: Path) -> int:
    from floral.errors import ConfigError
    from floral.report import pyplot
    from floral.sweep import write_run_figures

    if pyplot() is None:
        raise ConfigError("floral plot: needs matplotlib: pip install 'floral-lora[plot]'")
    written = write_run_figures(run)
    print(f"saved {len(written)} figures under {run}: {', '.join(p.name for p in written)}")
    return 0


def _report(out: Path, plots: bool) -> int:
    """Tables and figures of every finished run the folder's plans name."""
    from floral.progress import print_comparison
    from floral.report import comparison_rows, pyplot
    from floral.sweep import collect, load_grid, write_reports

    tasks, methods, _ = load_grid(out)
    results = collect(tasks, methods)
    written = write_reports(results, out, plots)
    for task in results:
        if task.summaries:
            print_comparison(comparison_rows(task.summaries), task.name)
    missing = "" if not plots or pyplot() else " (pip install 'floral-lora[plot]' for the figures)"
    print(f"saved {len(written)} tables and figures under {out}{missing}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from floral.export import generate_answers

    for answer in generate_answers(args.run, args.client, args.prompts, args.system):
        print(answer)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from floral.export import export_run

    for folder in export_run(args.run, args.out, args.client):
        print(folder)
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from floral.methods import registry

    entries = registry()
    width = max(len(name) for name in entries)
    for name, entry in entries.items():
        print(f"{name:<{width}}  {entry.description}")
    return 0


def _parse_seeds(text: str) -> list[int]:
    from floral.errors import ConfigError

    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: expected integers like 0,1,2, got {text!r}") from None
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    return seeds


if __name__ == "__main__":
    sys.exit(main())
