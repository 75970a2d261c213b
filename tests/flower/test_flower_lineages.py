"""A node keeps the private state of its `keep-runs` most recent runs, and the newest resumes.

Every run of an experiment on a node leaves a lineage folder in the node's `state-dir`
(floral.engines.flower.store). Several runs on the same nodes must leave only the newest
`keep-runs` of them, and a run stopped past its checkpoint must still resume to exactly the
numbers of the local engine's uninterrupted run.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("flwr")

from safetensors.torch import load_file  # noqa: E402
from support.flower import (  # noqa: E402
    Stop,
    assert_same_run,
    run_loopback,
    stop_after_round_3,
    tiny_experiment,
)

from floral.engines.flower.client import keep_runs  # noqa: E402
from floral.engines.flower.store import KEEP_RUNS, prune_lineages, valid_lineage  # noqa: E402
from floral.errors import ConfigError  # noqa: E402
from floral.experiment import resolve_config  # noqa: E402
from floral.run import run_experiment  # noqa: E402


def _lineage_of(out):
    """The run's name on the nodes, as its server saved it (the final state or checkpoint)."""
    path = out / "state.safetensors"
    if not path.exists():
        path = max((out / "checkpoint").glob("state-*.safetensors"))
    return bytes(load_file(path)["flower/lineage"].tolist()).hex()


def _lineages(node):
    return {p.name for p in node.iterdir() if valid_lineage(p.name)}


def test_prune_keeps_the_most_recently_used_and_the_current(tmp_path):
    names = [f"{k:032x}" for k in range(5)]
    for age, name in enumerate(names):  # names[0] is the newest, names[4] the oldest
        (tmp_path / name / "client-0").mkdir(parents=True)
        os.utime(tmp_path / name, ns=(10**18 - age * 10**9,) * 2)
    (tmp_path / "worker.log").write_text("kept")  # not a lineage: never touched
    (tmp_path / "not-a-lineage").mkdir()

    # The current run (the oldest here) stays, and counts as one of the kept.
    assert sorted(prune_lineages(tmp_path, names[4], 3)) == sorted(names[2:4])
    assert _lineages(tmp_path) == {names[0], names[1], names[4]}
    assert (tmp_path / "worker.log").exists() and (tmp_path / "not-a-lineage").is_dir()
    assert prune_lineages(tmp_path, names[0], 0) == []  # 0: keep everything
    assert _lineages(tmp_path) == {names[0], names[1], names[4]}
    assert prune_lineages(tmp_path, names[0], 1) == [names[1], names[4]]
    assert _lineages(tmp_path) == {names[0]}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".removed-")]


def test_keep_runs_is_checked():
    assert keep_runs({}) == KEEP_RUNS
    assert keep_runs({"keep-runs": 0}) == 0
    for bad in (-1, "2", True, 1.5):
        with pytest.raises(ConfigError, match="keep-runs must be an integer 0 or more"):
            keep_runs({"keep-runs": bad})


def test_after_several_runs_only_the_newest_remain_and_the_newest_resumes(tmp_path):
    overrides = ["train.rounds=4", "engine.checkpoint_every=2", "engine.eval_every=1",
                 "train.clients_per_round=1.0"]
    config = resolve_config(tiny_experiment("floral"), overrides)
    nodes = tmp_path / "nodes"
    keep = {k: {"keep-runs": 2} for k in range(config.task.num_clients)}

    finished = []
    for run in range(3):
        out = tmp_path / f"run{run}"
        run_loopback(config, out, state_dir=nodes, node_configs=keep)
        finished.append(_lineage_of(out))
    stopped = tmp_path / "stopped"
    with pytest.raises(Stop):
        run_loopback(config, stopped, state_dir=nodes, node_configs=keep,
                     on_round=stop_after_round_3)
    newest = _lineage_of(stopped)
    assert len({*finished, newest}) == 4  # every run had its own lineage
    for k in range(config.task.num_clients):
        assert _lineages(nodes / f"node{k}") == {finished[-1], newest}, k

    # The newest run resumes on restarted nodes to the uninterrupted local run's numbers.
    local = run_experiment(config, tmp_path / "local")
    summary, _ = run_loopback(config, stopped, state_dir=nodes, node_configs=keep, resume=True)
    assert_same_run(stopped, summary, tmp_path / "local", local)
    assert _lineage_of(stopped) == newest
    for k in range(config.task.num_clients):
        assert _lineages(nodes / f"node{k}") == {finished[-1], newest}, k
