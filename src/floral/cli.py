"""The `floral` command: run an experiment, compare methods, list methods."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from floral.errors import FloralError

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
    run.set_defaults(handler=_cmd_run)

    compare = sub.add_parser("compare", help="several methods x seeds on one task, as a table")
    compare.add_argument("config")
    compare.add_argument(
        "--methods",
        default="floral,fedavg,local-adaptor",
        help="comma-separated; options as name:key=value, e.g. floral:rank=0.1",
    )
    compare.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    compare.add_argument(
        "--jobs", type=int, default=0, help="runs in parallel (default: one per core)"
    )
    _add_common(compare)
    compare.set_defaults(handler=_cmd_compare)

    methods = sub.add_parser("methods", help="list the methods with a one-line description")
    methods.set_defaults(handler=_cmd_methods)
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set train.rounds=50 (repeatable)",
    )
    parser.add_argument("--out", help="results folder (default: results/<name>)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _cmd_run(args: argparse.Namespace) -> int:
    from floral.experiment import load_config, run_experiment
    from floral.progress import RunProgress, print_summary

    config = load_config(args.config, args.set)
    out = Path(args.out or config.output.dir or Path("results") / config.name)
    with RunProgress(config, disable=args.quiet) as progress:
        summary = run_experiment(config, out, resume=args.resume, on_round=progress.update)
    print_summary(summary)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    import os

    from floral.compare import load_base, parse_method_specs, plan_runs, run_all
    from floral.progress import GridProgress, print_comparison
    from floral.report import comparison_rows, plot_curves, write_comparison

    base = load_base(args.config)
    methods = parse_method_specs(args.methods)
    seeds = _parse_seeds(args.seeds)
    out = Path(args.out or Path("results") / f"{base['name']}-compare")
    runs = plan_runs(base, methods, seeds, out, args.set)
    jobs = args.jobs or min(os.cpu_count() or 1, len(runs))
    with GridProgress(runs, disable=args.quiet) as progress:
        results = run_all(runs, jobs, progress.update)
    grouped = {m.label: [results[r.key] for r in runs if r.method == m] for m in methods}
    rows = comparison_rows(grouped)
    title = f"{base['name']}: {len(seeds)} seed(s)"
    md, csv_path = write_comparison(rows, out, title)
    plot = plot_curves(grouped, out / "curves.png", title)
    print_comparison(rows, title)
    extra = f", {plot}" if plot else " (pip install 'floral[plot]' for the plot)"
    print(f"saved {md}, {csv_path}{extra}")
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
