"""Divergence stops a run at the last round that passed the rule, and `--resume` continues it
with named optimization settings changed, recorded in the run folder.

The rule (engine.divergence_factor, default 10): a round whose mean training loss is not
finite, or over 10 times the initial model's test loss (the round-0 row), did not happen.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import tomli_w

from floral.checkpoint import Checkpoint
from floral.cli import main
from floral.errors import ConfigError, DivergedError
from floral.experiment import build_engine, resolve_config
from floral.run import run_experiment


def _linear(lr: float, **engine: object) -> dict:
    return {
        "name": "diverging", "seed": 0,
        "task": {"dataset": "synthetic-linear", "shift": "none", "num_clients": 10,
                 "num_clusters": 2},
        "model": {"name": "linear"},
        "method": {"name": "floral"},
        "train": {"rounds": 8, "clients_per_round": 1.0, "batch_size": 4, "lr": lr,
                  "router_lr": 0.1},
        "engine": {"eval_every": 1, "checkpoint_every": 1, **engine},
    }


def test_a_run_that_diverges_stops_at_the_last_round_that_passed(tmp_path, capsys):
    path = tmp_path / "diverging.toml"
    path.write_text(tomli_w.dumps(_linear(1.5)))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("floral: error: round 3: the training loss ")
    assert "is over 10 times the initial model's test loss" in error
    assert "train.lr" in error and "--resume" in error
    assert not (out / "summary.json").exists()

    # Round 3's training diverged from round 2's state, so the kept checkpoint is round 1's:
    # the last state whose training passed the rule (round 2 trained from it).
    assert "the last good state (round 1)" in error
    _, progress = Checkpoint(out / "checkpoint").read()
    assert progress["round"] == 1
    rows = progress["rows"]
    assert [r["round"] for r in rows] == [0, 1]
    start = rows[0]["loss"]
    assert all(math.isfinite(r["mse"]) for r in rows)
    assert rows[1]["train_loss"] <= 10 * start

    # Resumed with a lower rate: the run finishes, and the folder says what changed when.
    assert main(["run", str(path), "--out", str(out), "--resume", "--set", "train.lr=0.1"]) == 0
    changes = json.loads((out / "changes.json").read_text())
    assert changes == [{"round": 1, "key": "train.lr", "from": 1.5, "to": 0.1}]
    assert "lr = 0.1" in (out / "config.toml").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 8 and summary["final"]["mse"] < rows[1]["mse"]
    metrics = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["round"]) for r in metrics] == list(range(9))


def test_resume_refuses_changes_that_make_another_experiment(tmp_path):
    config = resolve_config(_linear(1.5))
    with pytest.raises(DivergedError):
        run_experiment(config, tmp_path)
    for change, key in [({"seed": 1}, "seed"), ({"method": {"name": "fedavg"}}, "method.name"),
                        ({"task": {**_linear(0)["task"], "num_clients": 8}}, "task.num_clients")]:
        other = resolve_config({**_linear(0.1), **change})
        with pytest.raises(ConfigError, match=f"^{key}: differs from the checkpoint"):
            run_experiment(other, tmp_path, resume=True)


def test_a_loss_far_above_the_start_is_divergence_even_when_finite(tmp_path):
    # Digits with lr 1000 used to end "successfully" at chance with a training loss of 205.
    config = resolve_config({
        "name": "digits-diverge", "seed": 0,
        "task": {"dataset": "digits", "num_clients": 10, "num_clusters": 1, "shift": "none"},
        "model": {"name": "mlp", "hidden": [32]},
        "method": {"name": "fedavg"},
        "train": {"rounds": 4, "clients_per_round": 0.5, "lr": 1000.0, "batch_size": 16},
        "engine": {"eval_every": 1},
    })
    with pytest.raises(DivergedError, match=r"^round 1: the training loss .* over 10 times"):
        run_experiment(config, tmp_path / "on")
    # The rule can be set aside (0: only non-finite losses stop a run).
    lenient = resolve_config({**config.to_dict(), "engine": {
        **config.to_dict()["engine"], "divergence_factor": 0.0}})
    try:
        run_experiment(lenient, tmp_path / "off")
    except DivergedError as error:
        assert "not finite" in str(error) or "no longer finite" in str(error)


def test_the_rule_is_checked_before_work():
    with pytest.raises(ConfigError, match="engine.divergence_factor: must be 0"):
        resolve_config(_linear(0.1, divergence_factor=-1.0))


def test_a_client_without_training_examples_is_no_divergence(monkeypatch):
    # Its loss is NaN (it took no step) while its upload is a finite zero of weight 0.
    from floral.engines.local import LocalTransport

    real = LocalTransport.train

    def one_idle(self, round_, clients, payload):  # noqa: ANN001, ANN202
        replies = dict(real(self, round_, clients, payload))
        first = min(replies)
        replies[first].train_loss = math.nan
        return replies

    monkeypatch.setattr(LocalTransport, "train", one_idle)
    config = resolve_config(_linear(0.1))
    engine, _ = build_engine(config)
    engine.evaluate()  # round 0: the rule's reference
    result = engine.run_round()
    assert math.isfinite(result.train_loss) and result.applied == 10
