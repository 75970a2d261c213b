"""`[output] tensorboard` and `mlflow`: every metrics row of a run, round 0 (the model before
training) included, read back from what each tracker stored, equals metrics.csv; the headline
metrics lead each round's values; the routers' weights are logged beside them; MLflow's own
INFO lines do not print."""

from __future__ import annotations

import csv
import math
import os

import pytest

from floral.errors import ConfigError
from floral.experiment import resolve_config
from floral.run import run_experiment

TINY = {
    "name": "tracked",
    "seed": 1,
    "task": {"dataset": "synthetic-mlp", "shift": "none", "num_clients": 4, "num_clusters": 2,
             "samples_per_client": 16},
    "model": {"name": "mlp", "hidden": [4]},
    "method": {"name": "floral", "num_adaptors": 2},
    "train": {"rounds": 3, "clients_per_round": 1.0, "batch_size": 8},
    "engine": {"eval_every": 1},
}


def rows(out):
    with open(out / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


def tracked(**output):
    return resolve_config({**TINY, "output": output})


def test_tensorboard_holds_every_row_of_metrics_csv(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_experiment(tracked(tensorboard=True), tmp_path / "out")
    events = EventAccumulator(str(tmp_path / "out" / "tensorboard")).Reload()
    written = rows(tmp_path / "out")
    assert written[0]["round"] == "0"
    for key in ("mse", "loss", "mse_cluster1", "router_ari", "bytes_up"):
        logged = events.Scalars(key)
        assert [e.step for e in logged] == [int(r["round"]) for r in written]
        assert [e.value for e in logged] == pytest.approx([float(r[key]) for r in written],
                                                          rel=1e-6)  # stored as float32
    pi = [events.Scalars(f"router/client0/adaptor{c}")[-1].value for c in (0, 1)]
    assert math.isclose(sum(pi), 1.0, rel_tol=1e-5)


def test_mlflow_holds_every_row_and_the_config(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_experiment(tracked(mlflow=True), tmp_path / "out")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    client = mlflow.tracking.MlflowClient()
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.params["train.rounds"] == "3" and run.info.run_name == "tracked"
    history = client.get_metric_history(run.info.run_id, "mse")
    written = rows(tmp_path / "out")
    assert written[0]["round"] == "0"
    assert [m.step for m in history] == [int(r["round"]) for r in written]
    assert [m.value for m in history] == pytest.approx([float(r["mse"]) for r in written])


def test_a_missing_tracker_package_stops_before_any_work(tmp_path, monkeypatch):
    import floral.tracking as tracking

    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="output.mlflow: needs mlflow-skinny"):
        tracked(mlflow=True)


def test_plot_of_one_runs_folder_draws_its_figures(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from floral.cli import main

    run_experiment(tracked(), tmp_path / "out")
    assert main(["plot", str(tmp_path / "out")]) == 0
    for name in ("curves.png", "router_ari.png", "router_heatmap.png", "clusters.png"):
        assert (tmp_path / "out" / name).stat().st_size > 1000, name
    assert "saved 4 figures" in capsys.readouterr().out


def test_a_summary_whose_rows_add_columns_loads_with_gaps(tmp_path):
    from floral.compare import load_summary

    out = tmp_path / "out"
    run_experiment(tracked(), out)
    text = (out / "metrics.csv").read_text().splitlines()
    text[0] += ",mse_client9"
    text[1:] = [line + ("," if i else ",0.5") for i, line in enumerate(text[1:])]
    (out / "metrics.csv").write_text("\n".join(text) + "\n")
    history = load_summary(out).history
    assert history[0]["mse_client9"] == 0.5 and math.isnan(history[1]["mse_client9"])


def test_mlflow_prints_none_of_its_own_info_lines(tmp_path):
    """In a fresh process, as a user runs it: mlflow's import sets its loggers to INFO, and its
    table-creation lines must still not print."""
    pytest.importorskip("mlflow")
    import subprocess
    import sys

    import tomli_w

    config = tmp_path / "tracked.toml"
    config.write_text(tomli_w.dumps({**TINY, "train": {**TINY["train"], "rounds": 1},
                                     "output": {"mlflow": True}}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(
        [sys.executable, "-m", "floral.cli", "run", str(config), "--out", str(tmp_path / "out"),
         "--quiet"], capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "INFO" not in result.stderr, result.stderr
    assert (tmp_path / "out" / "mlflow.db").is_file()
