"""`floral sweep`: a grid of tasks x methods x seeds that skips finished runs and resumes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from floral.checkpoint import Checkpoint
from floral.cli import main
from floral.compare import (
    finished_summary,
    parse_method_specs,
    plan_runs,
    run_cost,
    run_peak_memory,
)
from floral.errors import ConfigError
from floral.run import run_experiment
from floral.sweep import format_grid_cell, load_grid, plan_sweep

TASK = """name = "{name}"
[task]
dataset = "digits"
shift = "{shift}"
num_clients = 8
num_clusters = 2
[model]
name = "mlp"
hidden = [16]
[train]
rounds = 4
clients_per_round = 0.5
batch_size = 16
[engine]
eval_every = 2
"""


def _task(folder: Path, name: str, shift: str) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(TASK.format(name=name, shift=shift))
    return path


@pytest.fixture
def two_tasks(tmp_path):
    return [_task(tmp_path, "ls", "label-shift"), _task(tmp_path, "rot", "rotate")]


def _sweep(configs, out, methods="fedavg,floral", *extra: str) -> int:
    args = ["sweep", *map(str, configs), "--methods", methods, "--seeds", "0,1"]
    return main([*args, "--out", str(out), "--quiet", "--jobs", "1", *extra])


def test_sweep_writes_a_folder_per_run_and_the_grid_table(tmp_path, two_tasks, capsys):
    out = tmp_path / "grid"
    assert _sweep(two_tasks, out) == 0
    for task in ("ls", "rot"):
        for method in ("fedavg", "floral"):
            for seed in (0, 1):
                assert (out / task / method / f"seed{seed}" / "summary.json").exists()
        assert "| floral |" in (out / task / "comparison.md").read_text()
        for figure in ("curves.png", "router_ari.png", "router_heatmap.png", "clusters.png"):
            assert (out / task / figure).stat().st_size > 1000, figure
    table = (out / "table.md").read_text()
    assert "| method | ls | rot |" in table
    assert table.count("| floral |") == 3  # metric, router ARI, seconds per run
    fedavg_ari_row = [line for line in table.splitlines() if line.startswith("| fedavg |")][1]
    assert fedavg_ari_row == "| fedavg | — | — |"
    assert run_cost(out / "ls" / "fedavg" / "seed0") > 0  # CPU seconds, measured per run
    assert "## CPU seconds per run" in table
    csv_lines = (out / "table.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 2 * 2 and csv_lines[0].startswith("task,method,metric")
    assert "floral" in capsys.readouterr().out


def test_a_second_sweep_reruns_nothing_and_a_grown_grid_runs_only_the_new_runs(tmp_path, two_tasks):
    out = tmp_path / "grid"
    assert _sweep(two_tasks[:1], out, "fedavg") == 0
    summary = out / "ls" / "fedavg" / "seed0" / "summary.json"
    before = summary.stat().st_mtime_ns
    # Same grid with another checkpoint interval (bookkeeping only): nothing runs again.
    assert _sweep(two_tasks[:1], out, "fedavg", "--checkpoint-every", "1") == 0
    assert summary.stat().st_mtime_ns == before
    # A grown grid (one more method, one more task) runs the new runs, and the report and
    # the manifest cover the whole folder.
    assert _sweep(two_tasks, out, "floral") == 0
    assert summary.stat().st_mtime_ns == before
    tasks, methods, seeds = load_grid(out)
    assert [m.label for m in methods] == ["fedavg", "floral"]
    assert [t.name for t in tasks] == ["ls", "rot"] and seeds == [0, 1]
    ls_table = (out / "ls" / "comparison.md").read_text()
    assert "| fedavg |" in ls_table and "| floral |" in ls_table


def test_a_changed_setting_is_a_different_run(tmp_path, two_tasks):
    out = tmp_path / "grid"
    assert _sweep(two_tasks[:1], out, "fedavg") == 0
    summary = out / "ls" / "fedavg" / "seed0" / "summary.json"
    before = summary.stat().st_mtime_ns
    assert _sweep(two_tasks[:1], out, "fedavg", "--set", "train.lr=0.05") == 0
    assert summary.stat().st_mtime_ns != before


def test_an_interrupted_run_resumes_and_ends_as_an_uninterrupted_one(tmp_path, two_tasks):
    methods = parse_method_specs("floral")
    (task,) = plan_sweep(
        two_tasks[:1], methods, [0], tmp_path / "grid", ["engine.checkpoint_every=1"]
    )
    (run,) = task.runs

    def stop_after_round_2(result, latest):  # noqa: ANN001
        if result.round == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(run.config, run.out_dir, on_round=stop_after_round_2)
    assert finished_summary(run) is None
    # As if written by an older floral that lacked a setting (it resolves to its default) ...
    saved = run.out_dir / "config.toml"
    saved.write_text(saved.read_text().replace('eval_clients = "all"\n', ""))
    # ... and marked, to tell a resumed run (keeps the checkpoint's rows) from a fresh one.
    checkpoint = Checkpoint(run.out_dir / "checkpoint")
    state, data = checkpoint.read()
    data["rows"][0]["train_loss"] = 123.0
    checkpoint.write(state, data, checkpoint.identity())
    assert (
        _sweep(
            two_tasks[:1], tmp_path / "grid", "floral", "--seeds", "0", "--checkpoint-every", "1"
        )
        == 0
    )
    resumed = finished_summary(run)
    fresh = run_experiment(run.config, tmp_path / "fresh")
    assert [row["round"] for row in resumed.history] == [0, 2, 4]
    assert resumed.history[0].pop("train_loss") == 123.0  # resumed, not started afresh
    fresh.history[0].pop("train_loss")
    for a, b in zip(resumed.history, fresh.history, strict=True):
        assert _numbers(a) == pytest.approx(_numbers(b), nan_ok=True)


def _numbers(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "seconds"}  # all but the wall clock


def test_a_failing_run_fails_alone_and_is_named_in_one_line(tmp_path, two_tasks, capsys):
    broken = tmp_path / "broken.toml"
    broken.write_text(
        TASK.format(name="broken", shift="rotate").replace(
            'dataset = "digits"', f'dataset = "mnist"\ndata_dir = "{tmp_path / "none"}"'
        )
    )
    out = tmp_path / "grid"
    assert _sweep([broken, two_tasks[0]], out, "fedavg") == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("floral: error: broken · fedavg seed 0:") and "\n" not in error
    assert (out / "ls" / "fedavg" / "seed1" / "summary.json").exists()
    assert "| fedavg |" in (out / "ls" / "comparison.md").read_text()


def test_a_crashing_run_stops_alone_and_leaves_its_traceback(
    tmp_path, two_tasks, capsys, monkeypatch
):
    import floral.compare

    real = floral.compare.run_experiment

    def crash_on_rotate(config, out_dir, **kwargs):  # noqa: ANN001, ANN003
        if config.task.shift == "rotate":
            raise RuntimeError("random_ expects 'from' to be less than 'to'")
        return real(config, out_dir, **kwargs)

    monkeypatch.setattr(floral.compare, "run_experiment", crash_on_rotate)
    out = tmp_path / "grid"
    assert _sweep(two_tasks, out, "fedavg", "--seeds", "0") == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("floral: error: rot · fedavg seed 0: RuntimeError: random_")
    assert "\n" not in error
    traceback_file = out / "rot" / "fedavg" / "seed0" / "error.txt"
    assert "crash_on_rotate" in traceback_file.read_text()  # the whole traceback is kept
    assert (out / "ls" / "fedavg" / "seed0" / "summary.json").exists()


def test_plot_rebuilds_tables_and_figures_from_the_folder(tmp_path, two_tasks):
    out = tmp_path / "grid"
    assert _sweep(two_tasks, out, "fedavg,floral", "--no-plots") == 0
    assert not (out / "ls" / "curves.png").exists()
    assert main(["plot", str(out)]) == 0
    assert (out / "ls" / "router_heatmap.png").stat().st_size > 1000
    assert (out / "table.md").exists()
    assert main(["plot", str(tmp_path)]) == 2  # no grid.json there: one-line error


def test_plot_reads_runs_kept_without_their_state(tmp_path, two_tasks):
    # Records kept without state.safetensors (as docs/results keeps them) still plot; the
    # router map comes from the seed whose state is there.
    out = tmp_path / "grid"
    assert _sweep(two_tasks[:1], out, "fedavg,floral", "--no-plots") == 0
    for method in ("fedavg", "floral"):
        (out / "ls" / method / "seed0" / "state.safetensors").unlink()
    assert main(["plot", str(out)]) == 0
    assert (out / "ls" / "router_heatmap.png").stat().st_size > 1000
    (out / "ls" / "floral" / "seed1" / "state.safetensors").unlink()
    (out / "ls" / "router_heatmap.png").unlink()
    assert main(["plot", str(out)]) == 0
    assert not (out / "ls" / "router_heatmap.png").exists()  # no final pi left to draw
    assert (out / "ls" / "curves.png").exists()


def test_plan_rejects_two_tasks_with_one_name(tmp_path):
    first = _task(tmp_path, "same", "rotate")
    second = tmp_path / "other.toml"
    second.write_text(first.read_text())
    with pytest.raises(Exception, match="a second task named 'same'"):
        plan_sweep([first, second], parse_method_specs("fedavg"), [0], tmp_path / "out")


def test_compare_is_a_flat_sweep_of_one_task(tmp_path, two_tasks):
    out = tmp_path / "cmp"
    assert (
        main(
            [
                "compare",
                str(two_tasks[0]),
                "--methods",
                "fedavg",
                "--out",
                str(out),
                "--quiet",
                "--jobs",
                "1",
            ]
        )
        == 0
    )
    assert (out / "fedavg" / "seed0" / "summary.json").exists()
    assert json.loads((out / "grid.json").read_text())["tasks"][0]["dir"] == "."
    runs = plan_runs({"name": "x"}, parse_method_specs("fedavg"), [0], out)
    assert runs[0].key == "x · fedavg seed 0"


def test_grid_cells_follow_the_paper():
    assert format_grid_cell(93.84, 0.51, "accuracy") == "93.8 (0.5)"
    assert format_grid_cell(0.00241, 0.00031, "mse") == "0.00241 (0.00031)"
    assert format_grid_cell(float("nan"), 0.0, "accuracy") == "—"


def test_method_specs_keep_list_values_whole():
    specs = parse_method_specs("fedit,hetlora:rank_tiers=[2, 4,8]:comm.upload=quant:4,flasc")
    assert [s.name for s in specs] == ["fedit", "hetlora", "flasc"]
    assert specs[1].options == (("rank_tiers", [2, 4, 8]), ("comm.upload", "quant:4"))
    assert specs[1].folder == "hetlora_rank_tiers=2-4-8_comm.upload=quant_4"
    with pytest.raises(ConfigError, match="unbalanced"):
        parse_method_specs("hetlora:rank_tiers=[2,4")


def test_parallel_runs_equal_sequential_ones_and_each_has_its_peak_memory(tmp_path, two_tasks):
    args = ["--methods", "fedavg,floral", "--seeds", "0", "--set", "train.rounds=1", "--quiet"]
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    assert main(["sweep", str(two_tasks[0]), *args, "--out", str(serial), "--jobs", "1"]) == 0
    assert main(["sweep", str(two_tasks[0]), *args, "--out", str(parallel), "--jobs", "2"]) == 0
    for method in ("fedavg", "floral"):
        run = Path("ls") / method / "seed0"
        assert _metric_rows(serial / run) == _metric_rows(parallel / run)
        assert run_peak_memory(serial / run) is None  # this process ran other things before
        # A fresh process per run: at least torch's own footprint, far below a reused worker's
        assert 100 < run_peak_memory(parallel / run) < 4000


def _metric_rows(run: Path) -> list[dict[str, str]]:
    """A run's metrics rows without the wall-clock column."""
    with open(run / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def test_a_resumed_run_s_cost_is_every_attempt_s_cpu_time(tmp_path, two_tasks, monkeypatch):
    import floral.compare as compare

    clock = [100.0]  # CPU seconds, as time.process_time reports them; set by the test
    monkeypatch.setattr(compare.time, "process_time", lambda: clock[0])
    (task,) = plan_sweep(two_tasks[:1], parse_method_specs("fedavg"), [0], tmp_path / "grid",
                         ["engine.checkpoint_every=1"])
    (run,) = task.runs

    def first_attempt(key, round_, total, latest):  # noqa: ANN001
        clock[0] += 10.0  # each round costs 10 CPU seconds ...
        if round_ == 2:
            clock[0] += 5.0  # ... and 5 more are spent when the machine goes down
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compare._run_one(run, first_attempt)
    # Recorded at round 2's report: round 1 was measured (10 s); round 2's 10 s and the 5 s
    # after it are lost with the machine (round 2 was checkpointed, so it is not redone).
    assert json.loads((run.out_dir / "cost.json").read_text())["cpu_seconds"] == 10.0
    assert compare.run_cost(run.out_dir) is None  # unfinished

    def second_attempt(key, round_, total, latest):  # noqa: ANN001
        clock[0] += 7.0

    compare._run_one(run, second_attempt)
    cost = json.loads((run.out_dir / "cost.json").read_text())
    rounds_after = run.config.train.rounds - 2  # resumed from round 2's checkpoint
    assert cost["resumed"] and cost["complete"]
    assert cost["cpu_seconds"] == 10.0 + 7.0 * rounds_after
    assert compare.run_cost(run.out_dir) == cost["cpu_seconds"]
    # A run resumed after an attempt that recorded nothing is marked as partly measured.
    (run.out_dir / "cost.json").write_text(json.dumps({"cpu_seconds": 3.0, "resumed": True}))
    assert compare.run_cost(run.out_dir) is None


def test_a_run_started_afresh_over_another_experiment_s_checkpoint_carries_no_cost(
    tmp_path, two_tasks, monkeypatch
):
    import floral.compare as compare

    clock = [0.0]
    monkeypatch.setattr(compare.time, "process_time", lambda: clock[0])
    methods = parse_method_specs("fedavg")

    def plan(*overrides: str):  # noqa: ANN202
        (task,) = plan_sweep(two_tasks[:1], methods, [0], tmp_path / "grid",
                             ["engine.checkpoint_every=1", *overrides])
        return task.runs[0]

    def interrupted(key, round_, total, latest):  # noqa: ANN001
        clock[0] += 100.0
        if round_ == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compare._run_one(plan(), interrupted)
    assert json.loads((plan().out_dir / "cost.json").read_text())["cpu_seconds"] == 100.0
    # Another batch size is another experiment: its checkpoint is not resumed, nor its cost.
    other = plan("train.batch_size=7")
    compare._run_one(other, lambda *args: clock.__setitem__(0, clock[0] + 1.0))
    cost = json.loads((other.out_dir / "cost.json").read_text())
    assert not cost["resumed"] and cost["complete"]
    assert cost["cpu_seconds"] == other.config.train.rounds * 1.0
