"""Rounds count only the updates they applied, name what they dropped and why, and a run whose
rounds apply too few (`engine.min_fit_clients`, `engine.accept_failures`) never ends in success.
"""

from __future__ import annotations

import csv
import logging

import pytest
import tomli_w

from floral.cli import main
from floral.engines.local import LocalTransport
from floral.errors import ConfigError, RoundFailedError
from floral.experiment import resolve_config
from floral.run import run_experiment


def _experiment(**train: object) -> dict:
    return {
        "name": "honest", "seed": 5,
        "task": {"dataset": "synthetic-mlp", "shift": "none", "num_clients": 4,
                 "num_clusters": 2, "samples_per_client": 40},
        "model": {"name": "mlp", "hidden": [8]},
        "method": {"name": "fedavg"},
        "train": {"rounds": 3, "clients_per_round": 1.0, "batch_size": 8, "lr": 0.05, **train},
        "engine": {"eval_every": 1},
    }


def _lose(clients: set[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Replies of `clients` are lost on the way, every round."""
    real = LocalTransport.train

    def lossy(self, round_, ks, payload):  # noqa: ANN001, ANN202
        replies = dict(real(self, round_, ks, payload))
        for k in clients & set(replies):
            replies[k] = "lost on the way"
        return replies

    monkeypatch.setattr(LocalTransport, "train", lossy)


def test_rows_count_applied_and_dropped_updates(tmp_path, monkeypatch, caplog):
    _lose({1}, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="floral"):
        summary = run_experiment(resolve_config(_experiment()), tmp_path)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [(r["updates_applied"], r["updates_dropped"]) for r in rows] == [
        ("0", "0"), ("3", "1"), ("6", "2"), ("9", "3")]
    assert any("round 2: dropped the reply of client 1: lost on the way" in r.getMessage()
               for r in caplog.records)
    assert summary.final["clients_evaluated"] == 4  # evaluation still reaches everyone


def test_a_run_whose_rounds_apply_nothing_fails_naming_the_round_and_reasons(
        tmp_path, monkeypatch, capsys):
    _lose({0, 1, 2, 3}, monkeypatch)
    path = tmp_path / "honest.toml"
    path.write_text(tomli_w.dumps(_experiment()))
    code = main(["run", str(path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("floral: error:")]
    assert len(errors) == 1 and err.endswith(errors[0])  # one line, the last
    assert errors[0].startswith("floral: error: round 1: 0 of 4 updates applied, fewer than "
                          "engine.min_fit_clients = 1 (client 0: lost on the way; client 1:")
    assert not (tmp_path / "run" / "summary.json").exists()  # no success recorded
    assert (tmp_path / "run" / "checkpoint").is_dir()  # the last whole round: round 0


def test_min_fit_clients_and_accept_failures(tmp_path, monkeypatch):
    _lose({2}, monkeypatch)
    with pytest.raises(RoundFailedError, match=r"^round 1: 3 of 4 updates applied, fewer than "
                       r"engine.min_fit_clients = 4 \(client 2: lost on the way\)"):
        run_experiment(resolve_config({**_experiment(), "engine": {"min_fit_clients": 4}}),
                       tmp_path / "four")
    with pytest.raises(RoundFailedError, match="engine.accept_failures = false"):
        run_experiment(resolve_config({**_experiment(), "engine": {"accept_failures": False}}),
                       tmp_path / "strict")


@pytest.mark.parametrize(("engine", "words"), [
    ({"min_fit_clients": 0}, "engine.min_fit_clients: must be at least 1"),
    ({"min_fit_clients": 5}, "engine.min_fit_clients: 5 can never be met: a round samples 4"),
])
def test_impossible_minimums_are_refused_before_work(engine, words):
    with pytest.raises(ConfigError, match=words):
        resolve_config({**_experiment(), "engine": engine})


def test_a_flower_round_whose_replies_all_fail_fails_the_run(tmp_path, caplog):
    pytest.importorskip("flwr")
    from support.flower import FAULTS, faulty_client_app, run_loopback

    from floral.flower_app import log_round

    config = resolve_config({**_experiment(rounds=1), "engine": {"min_fit_clients": 2}})
    with pytest.raises(RoundFailedError) as error:
        run_loopback(config, tmp_path / "run", faulty_client_app)
    message = str(error.value)
    assert message.startswith("round 1: 1 of 4 updates applied, fewer than "
                              "engine.min_fit_clients = 2")
    assert all(f"client {k}:" in message for k in FAULTS) and "client 3:" not in message
    assert not (tmp_path / "run" / "summary.json").exists()

    # Without the minimum the round goes on with client 3, and its log line says so.
    with caplog.at_level(logging.INFO, logger="flwr.floral"):
        lenient = resolve_config(_experiment(rounds=1))
        summary, _ = run_loopback(lenient, tmp_path / "lenient", faulty_client_app,
                                  on_round=log_round)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("round 1: ")]
    assert any(line.startswith("round 1: 1 of 4 updates applied; dropped client 0: ")
               for line in lines), lines
    assert summary.final["updates_applied"] == 1
