"""Progress off a terminal (a log, nohup, CI): a plain line at a fixed interval with the round,
the clients done in it, the time elapsed and left, where a bar would only be drawn at the end."""

from __future__ import annotations

from types import SimpleNamespace

from support.experiment import TINY

from floral.cli import main
from floral.progress import GridProgress, RunProgress

CONFIG = SimpleNamespace(name="tiny", method_name="floral", train=SimpleNamespace(rounds=4))


def test_the_plain_line_says_round_clients_elapsed_and_eta():
    progress = RunProgress(CONFIG, plain=True, every=3600)
    with progress:
        assert progress.line().startswith("tiny · floral: setting up (data, model), 0:00:0")
        progress.client("evaluate", 2, 3)
        line = progress.line()
        assert line.startswith("tiny · floral: round 0 of 4 (the model before training), "
                               "2/3 clients evaluated, 0:00:00 elapsed, ETA —")
        progress.client("train", 1, 4)
        line = progress.line()
        assert line.startswith("tiny · floral: round 1 of 4, 1/4 clients trained, 0:00:00 "
                               "elapsed, ETA 0:00:0")
        progress.update(SimpleNamespace(round=1), {"chrf": 41.25, "perplexity": 9.0})
        assert progress.line().endswith("; chrF 41.2")
        assert ", round 2 of 4," in f", {progress.line().split(': ', 1)[1]}"
        progress.update(SimpleNamespace(round=4), {})
        assert "all 4 rounds done" in progress.line()


def test_a_resumed_run_estimates_the_time_left_from_its_first_round_here():
    progress = RunProgress(CONFIG, plain=True, every=3600, resumed=True)
    with progress:
        progress.client("train", 3, 4)
        assert progress.line().startswith("tiny · floral: resumed, 3/4 clients trained, ")
        assert progress.line().endswith("ETA —")
        progress.update(SimpleNamespace(round=3), {})  # resumed after round 2
        assert progress.line().endswith("ETA —")
        progress.client("train", 2, 4)
        line = progress.line()
        assert "round 4 of 4, 2/4 clients trained" in line and not line.endswith("ETA —")


def test_a_run_off_a_terminal_prints_plain_lines_as_it_goes(tmp_path, monkeypatch, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    monkeypatch.setenv("FLORAL_PROGRESS_EVERY", "0.005")
    capsys.readouterr()
    assert main(["run", str(config), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert "━" not in "".join(err)  # no bar drawn at the end
    assert err and all(line.startswith("tiny · floral: ") for line in err)
    assert any(" clients trained, " in line or " clients evaluated, " in line for line in err)


def test_a_grid_off_a_terminal_counts_rounds_and_runs():
    runs = [SimpleNamespace(key=k, config=CONFIG) for k in ("a", "b")]
    progress = GridProgress(runs, plain=True, every=3600)
    with progress:
        progress.update("a", 4, 4, {})  # finished before: skipped
        progress.update("b", 1, 4, {})
        line = progress.line()
    assert line.startswith("all runs: 5/8 rounds, 1/2 runs done, 0:00:00 elapsed, ETA 0:00:0")
