"""Experiments end to end: config errors, results folder, determinism, resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.experiment import TINY

from floral.checkpoint import Checkpoint
from floral.cli import main
from floral.experiment import load_config
from floral.run import run_experiment


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _without_time(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.lrr=0.1", "train.lrr: unknown key"),
        ("train.rounds=ten", "train.rounds: expected an integer"),
        ("train.batch_size=1.5", "train.batch_size: expected an integer"),
        ("method.rank=fast", "method.rank"),
        ("method.name=nope", "method.name: unknown 'nope'"),
        ("task.shift=rotat", "task.shift"),
        ("task.dataset=imagenet", "task.dataset"),
        ("train.clients_per_round=0", "train.clients_per_round"),
        ("colour=1", "colour: unknown key"),
    ],
)
def test_bad_settings_stop_with_one_line_and_exit_2(tiny, tmp_path, capsys, override, needle):
    code = main(["run", str(tiny), "--set", override, "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 2
    line = _error_line(capsys)
    assert needle in line
    assert not (tmp_path / "o" / "metrics.csv").exists()  # stopped before any work


def test_missing_dataset_says_how_to_get_it(tiny, tmp_path, capsys):
    code = main(["run", str(tiny), "--quiet", "--out", str(tmp_path / "o"),
                 "--set", "task.dataset=fashion-mnist", "--set", "task.shift=rotate",
                 "--set", "task.samples_per_client=0",  # a synthetic option: not for images
                 "--set", f"task.data_dir={tmp_path / 'empty'}"])
    assert code == 2
    line = _error_line(capsys)
    assert "apt-get install dataset-fashion-mnist" in line and "task.data_dir" in line
    assert str(tmp_path / "empty") in line


def test_missing_file_and_bad_toml(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.toml")]) == 2
    assert "no such experiment file" in _error_line(capsys)
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nrounds = 1")
    assert main(["run", str(bad)]) == 2
    assert "not valid TOML" in _error_line(capsys)


def test_results_folder_and_same_seed_same_numbers(tiny, tmp_path):
    config = load_config(tiny)
    first = run_experiment(config, tmp_path / "a")
    second = run_experiment(config, tmp_path / "b")
    for name in ("config.toml", "metrics.csv", "summary.json", "state.safetensors"):
        assert (tmp_path / "a" / name).exists()
    rows = _rows(tmp_path / "a" / "metrics.csv")
    assert [int(r["round"]) for r in rows] == [0, 2, 4, 6]
    assert _without_time(rows) == _without_time(_rows(tmp_path / "b" / "metrics.csv"))
    assert first.final == second.final
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["rounds"] == 6 and summary["bytes_up"] > 0 and summary["bytes_down"] > 0
    # The resolved config reloads to the same experiment.
    assert load_config(tmp_path / "a" / "config.toml").to_dict() == config.to_dict()


def test_resume_from_half_way_equals_uninterrupted(tiny, tmp_path):
    full = load_config(tiny, ["engine.checkpoint_every=3"])
    run_experiment(full, tmp_path / "full")
    # Stop at round 3 as Ctrl-C would: the interrupted run checkpoints where it stands.
    def interrupt(result, latest):
        if result.round == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(full, tmp_path / "resumed", on_round=interrupt)
    manifest = json.loads((tmp_path / "resumed" / "checkpoint" / "manifest.json").read_text())
    assert manifest["round"] == 3 and sorted(manifest["files"]) == [
        "progress-3.json", "state-3.safetensors"]
    assert main(["run", str(tiny), "--set", "engine.checkpoint_every=3", "--resume", "--quiet",
                 "--out", str(tmp_path / "resumed")]) == 0
    want = _without_time(_rows(tmp_path / "full" / "metrics.csv"))
    got = _without_time(_rows(tmp_path / "resumed" / "metrics.csv"))
    assert got == want
    a = load_file(tmp_path / "full" / "state.safetensors")
    b = load_file(tmp_path / "resumed" / "state.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_run_resumed_with_other_rounds_records_the_rounds_it_ran(tiny, tmp_path):
    def interrupt(result, latest):
        if result.round == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(load_config(tiny, ["engine.checkpoint_every=3"]), tmp_path / "r",
                       on_round=interrupt)
    assert load_config(tmp_path / "r" / "config.toml").train.rounds == 6
    assert main(["run", str(tiny), "--set", "engine.checkpoint_every=3", "--set",
                 "train.rounds=4", "--resume", "--quiet", "--out", str(tmp_path / "r")]) == 0
    rows = _rows(tmp_path / "r" / "metrics.csv")
    assert int(rows[-1]["round"]) == 4
    # The folder's config is the one that ran to the end, so it reruns the same experiment.
    assert load_config(tmp_path / "r" / "config.toml").train.rounds == 4


@pytest.mark.parametrize("server", [{}, {"train.server_optimizer": "adam",
                                         "train.server_lr": 0.05}])
def test_ctrl_c_in_the_middle_of_a_round_resumes_to_the_uninterrupted_numbers(
        tiny, tmp_path, monkeypatch, server):
    from floral.methods.floral import Floral

    settings = ["engine.checkpoint_every=0", *(f"{k}={v}" for k, v in server.items())]
    full = load_config(tiny, settings)
    run_experiment(full, tmp_path / "full")
    # Ctrl-C while round 4's clients finish their steps (trained together, by default): they
    # have trained, and the round has not ended.
    original = Floral.finish_batch

    def finish(self, slots, jobs, *args):
        if jobs[0].round == 4:
            raise KeyboardInterrupt
        return original(self, slots, jobs, *args)

    monkeypatch.setattr(Floral, "finish_batch", finish)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(full, tmp_path / "resumed")
    monkeypatch.setattr(Floral, "finish_batch", original)
    manifest = json.loads((tmp_path / "resumed" / "checkpoint" / "manifest.json").read_text())
    assert manifest["round"] == 3  # the last whole round
    run_experiment(full, tmp_path / "resumed", resume=True)
    assert _without_time(_rows(tmp_path / "resumed" / "metrics.csv")) == _without_time(
        _rows(tmp_path / "full" / "metrics.csv"))
    a = load_file(tmp_path / "full" / "state.safetensors")
    b = load_file(tmp_path / "resumed" / "state.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_different_experiment(tiny, tmp_path, capsys):
    config = load_config(tiny, ["engine.checkpoint_every=3"])
    run_experiment(config, tmp_path / "o")
    code = main(["run", str(tiny), "--set", "train.batch_size=3", "--resume", "--quiet",
                 "--out", str(tmp_path / "o")])
    assert code == 2
    line = _error_line(capsys)
    assert "train.batch_size: differs from the checkpoint" in line
    assert "a resumed run may change train.lr" in line  # the optimization settings may


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda s: s.update({"private/0/old": torch.zeros(2)}), "private tensor 'old'"),
        (lambda s: s.update({"global/old_factor": torch.zeros(2)}), "global tensor 'old_factor'"),
        (lambda s: s.pop(next(k for k in list(s) if k.startswith("global/"))), "lacks global"),
    ],
)
def test_resume_refuses_a_checkpoint_of_another_model_in_one_line(tiny, tmp_path, capsys, edit,
                                                                  words):
    config = load_config(tiny, ["engine.checkpoint_every=3", "method.name=floral"])
    run_experiment(config, tmp_path / "o")
    checkpoint = Checkpoint(tmp_path / "o" / "checkpoint")
    state, progress = checkpoint.read()
    edit(state)
    checkpoint.write(state, progress, checkpoint.identity())  # a complete, valid checkpoint
    code = main(["run", str(tiny), "--set", "engine.checkpoint_every=3", "--set",
                 "method.name=floral", "--resume", "--quiet", "--out", str(tmp_path / "o")])
    assert code == 2
    line = _error_line(capsys)
    assert words in line and "delete it" in line


def test_methods_command_lists_every_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("fedavg", "local", "floral", "floral-oracle", "local-adaptor", "ensemble",
                 "ensemble-oracle"):
        assert any(line.split()[0] == name for line in out.splitlines()), name


def test_bytes_are_counted_on_the_tensors_sent(tiny, tmp_path):
    config = load_config(tiny, ["method.name=fedavg"])
    summary = run_experiment(config, tmp_path / "o")
    model_floats = 10 * 8 + 8 + 8 * 1 + 1  # MLP 10-8-1
    clients_per_round = 4  # half of 8
    rounds = 6
    assert summary.bytes_down == rounds * clients_per_round * model_floats * 4
    # Up: each client's weighted delta plus one float32 weight per tensor (4 tensors).
    assert summary.bytes_up == rounds * clients_per_round * (model_floats + 4) * 4


def test_evaluation_on_sampled_clients_only(tiny, tmp_path):
    from floral.experiment import build_engine

    config = load_config(tiny, ["engine.eval_clients=sampled"])
    engine, task = build_engine(config)
    result = engine.run_round()
    # Round 1 is no evaluation round (eval_every = 2); 4 of the 8 clients trained in it.
    assert result.eval == {} and len(result.clients) == 4
    engine.config.eval_every = 1
    result = engine.run_round()
    expected = engine.evaluate(result.clients)
    assert result.eval == expected
    assert result.eval != engine.evaluate()  # all clients give other numbers


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=nan", "train.lr: expected a finite number, got nan"),
        ("train.lr=inf", "train.lr: expected a finite number, got inf"),
        ("train.lr=-inf", "train.lr: expected a finite number, got -inf"),
        ("train.router_lr=nan", "train.router_lr: expected a finite number, got nan"),
        ("train.server_lr=+inf", "train.server_lr: expected a finite number, got inf"),
        ("train.server_betas=[0.9, nan]",
         "train.server_betas[1]: expected a finite number, got nan"),
        ("task.data_fraction=nan", "task.data_fraction: expected a finite number, got nan"),
        ("method.alpha=inf", "method.alpha: expected a finite number, got inf"),
        ("method.rank=nan", "method.rank: expected a finite number, got nan"),
    ],
)
def test_nan_and_infinity_stop_with_one_line_and_write_nothing(
    tiny, tmp_path, capsys, override, message
):
    out = tmp_path / "o"
    code = main(["run", str(tiny), "--set", override, "--out", str(out), "--quiet"])
    assert code == 2
    assert _error_line(capsys) == f"floral: error: {message}"
    assert not out.exists()  # stopped before the results folder was made


def test_a_rank_above_a_layer_is_reported_and_trained_as_asked(tiny, tmp_path, caplog):
    # The tiny MLP is 10 -> 8 -> 1: rank 9 fits neither layer (min(d_in, d_out) = 8 and 1).
    out = tmp_path / "o"
    with caplog.at_level("WARNING", logger="floral"):
        code = main(["run", str(tiny), "--set", "method.rank=9", "--set", "train.rounds=1",
                     "--set", "engine.eval_every=1", "--out", str(out), "--quiet"])
    assert code == 0
    warnings = [r.getMessage() for r in caplog.records if "is more than" in r.getMessage()]
    assert warnings == [
        "rank = 9 is more than layer 'fc1' allows (min(d_in, d_out) = min(10, 8) = 8): "
        "1 of its ranks only adds parameters",
        "rank = 9 is more than layer 'fc2' allows (min(d_in, d_out) = min(8, 1) = 1): "
        "8 of its ranks only add parameters",
    ]
