"""Nothing lost, nothing silent: divergence stops with a saved checkpoint, checkpoints survive
a kill at any point of their write, a results folder is never replaced unasked, and corrupt
or foreign files are one-line errors."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.experiment import TINY_FEDAVG as TINY

from floral import checkpoint as checkpoint_module
from floral.checkpoint import Checkpoint, json_safe
from floral.cli import main
from floral.experiment import load_config
from floral.run import run_experiment


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def _run(tiny: Path, out: Path, *args: str) -> int:
    return main(["run", str(tiny), "--quiet", "--out", str(out), *args])


def _error_line(capsys) -> str:  # noqa: ANN001
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def _numbers(path: Path) -> list[str]:
    """metrics.csv without its time column."""
    lines = path.read_text().splitlines()
    drop = lines[0].split(",").index("seconds")
    return [",".join(v for i, v in enumerate(line.split(",")) if i != drop) for line in lines]


# -- divergence ---------------------------------------------------------------------------------
def test_a_diverging_run_stops_in_one_line_with_its_last_good_state_saved(tiny, tmp_path, capsys):
    out = tmp_path / "o"
    assert _run(tiny, out, "--set", "train.lr=100", "--set", "engine.checkpoint_every=0") == 2
    line = _error_line(capsys)
    assert line.startswith("floral: error: round ") and "lower train.lr" in line
    stopped = int(line.split("round ")[1].split(":")[0])
    checkpoint = Checkpoint(out / "checkpoint")
    state, progress = checkpoint.read()
    assert progress["round"] == stopped - 1 == int(state["engine/round"])
    assert all(bool(t.isfinite().all()) for k, t in state.items() if k.startswith("global/"))
    assert not (out / "summary.json").exists()  # not a finished run


def test_summary_json_is_strict_json():
    assert json.dumps(json_safe({"a": float("nan"), "b": [1.0, float("inf")]}),
                      allow_nan=False) == '{"a": null, "b": [1.0, null]}'


# -- atomic checkpoints -------------------------------------------------------------------------
class Killed(BaseException):
    """A kill: nothing in floral catches it."""


@pytest.mark.parametrize("step", range(4))
def test_a_kill_at_any_point_of_a_checkpoint_write_resumes_to_the_same_numbers(
    tiny, tmp_path, monkeypatch, caplog, step
):
    config = load_config(tiny)
    run_experiment(config, tmp_path / "whole")
    # Fail the checkpoint of round 4 at its step-th file operation: the three renames
    # (state, progress, manifest), then removing the round-2 files.
    calls = {"n": 0}
    real_replace, real_unlink = os.replace, Path.unlink

    def counting(real):  # noqa: ANN001, ANN202
        def operation(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            if "state-4" in str(list(Path(tmp_path / "cut" / "checkpoint").glob("*"))):
                calls["n"] += 1
                if calls["n"] > step:
                    raise Killed
            return real(*args, **kwargs)
        return operation

    monkeypatch.setattr(checkpoint_module.os, "replace", counting(real_replace))
    monkeypatch.setattr(Path, "unlink", counting(real_unlink))
    with pytest.raises(Killed):
        run_experiment(config, tmp_path / "cut")
    monkeypatch.undo()

    with caplog.at_level(logging.WARNING, logger="floral"):
        resumed = run_experiment(config, tmp_path / "cut", resume=True)
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert resumed.final == pytest.approx(whole["final"])
    assert _numbers(tmp_path / "cut" / "metrics.csv") == _numbers(
        tmp_path / "whole" / "metrics.csv")
    a, b = load_file(tmp_path / "whole" / "state.safetensors"), load_file(
        tmp_path / "cut" / "state.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    if step < 3:  # the new manifest never landed: round 2's checkpoint was used, strays named
        assert any("partial checkpoint write" in r.getMessage() for r in caplog.records)


# -- protected results ----------------------------------------------------------------------------
def test_a_finished_run_is_not_replaced_unasked(tiny, tmp_path, capsys):
    out = tmp_path / "o"
    assert _run(tiny, out) == 0
    summary = (out / "summary.json").read_text()
    assert _run(tiny, out, "--set", "train.lr=0.1") == 2
    line = _error_line(capsys)
    assert "holds a finished run" in line and "--overwrite" in line
    assert (out / "summary.json").read_text() == summary  # nothing lost
    assert _run(tiny, out, "--set", "train.lr=0.1", "--overwrite") == 0
    assert "lr = 0.1" in (out / "config.toml").read_text()


def test_resume_never_picks_up_another_runs_checkpoint(tiny, tmp_path, capsys):
    out = tmp_path / "o"
    config = load_config(tiny)

    def stop(result, latest):  # noqa: ANN001, ANN202
        if result.round == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, out, on_round=stop)
    # Another experiment into the same folder replaces the old checkpoint with its own ...
    assert _run(tiny, out, "--set", "train.lr=0.1", "--set", "engine.checkpoint_every=0",
                "--overwrite") == 0
    capsys.readouterr()
    # ... so resuming the first experiment there finds nothing of it, and says so.
    assert _run(tiny, out, "--resume") == 2
    assert "no complete checkpoint" in _error_line(capsys)


# -- corrupt and foreign files ----------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated state", "garbage state", "truncated progress",
                                    "garbage manifest", "manifest without files"])
def test_corrupt_checkpoint_files_are_one_line_errors(tiny, tmp_path, capsys, damage):
    out = tmp_path / "o"

    def stop(result, latest):  # noqa: ANN001, ANN202
        if result.round == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(load_config(tiny), out, on_round=stop)
    folder = out / "checkpoint"
    state, progress = folder / "state-3.safetensors", folder / "progress-3.json"
    if damage == "truncated state":
        state.write_bytes(state.read_bytes()[:50])
    elif damage == "garbage state":
        state.write_bytes(b"\x00garbage" * 10)
    elif damage == "truncated progress":
        progress.write_text(progress.read_text()[:20])
    elif damage == "garbage manifest":
        (folder / "manifest.json").write_text("{not json")
    else:
        (folder / "manifest.json").write_text('{"round": 3, "identity": {}}')
    assert _run(tiny, out, "--resume") == 2
    line = _error_line(capsys)
    assert str(folder) in line


def test_a_garbage_results_config_is_a_one_line_error_for_export(tmp_path, capsys):
    from floral.errors import ConfigError
    from floral.export import export_run

    (tmp_path / "state.safetensors").write_bytes(b"")
    (tmp_path / "config.toml").write_text("name = [unclosed")
    with pytest.raises(ConfigError, match="not valid TOML"):
        export_run(tmp_path, tmp_path / "peft")


@pytest.mark.parametrize("damage", ["grid.json", "summary.json", "config.toml"])
def test_floral_plot_on_a_damaged_grid_is_a_one_line_error(tmp_path, capsys, damage):
    config = tmp_path / "lin.toml"
    config.write_text(TINY)
    out = tmp_path / "grid"
    assert main(["compare", str(config), "--methods", "fedavg", "--set", "train.rounds=2",
                 "--out", str(out), "--quiet", "--no-plots"]) == 0
    capsys.readouterr()
    target = {"grid.json": out / "grid.json",
              "summary.json": out / "fedavg" / "seed0" / "summary.json",
              "config.toml": out / "fedavg" / "seed0" / "config.toml"}[damage]
    target.write_text("{not [valid")
    assert main(["plot", str(out)]) == 2
    assert str(target) in _error_line(capsys)


def test_a_corrupt_peft_adapter_is_a_one_line_error(tmp_path):
    pytest.importorskip("peft")
    from floral.errors import ConfigError
    from floral.llm.peft_io import import_peft

    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ConfigError, match="not a readable safetensors file") as error:
        import_peft(torch.nn.Linear(2, 2), tmp_path)
    assert "\n" not in str(error.value)
