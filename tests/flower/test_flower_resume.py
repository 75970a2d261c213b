"""Resume on Flower: the ServerApp's checkpoints, the nodes' private state on their own disks.

A run stopped after its checkpoint at round 2 (its nodes already trained round 3) and resumed
on restarted nodes must end with exactly the numbers and global tensors of the local engine's
uninterrupted run: the server goes back to round 2, every node to the private state it held
after round 2. The loopback grid runs the ServerApp and ClientApp logic in this process (a
restarted node is a fresh `Context`); the Ray simulation test is the same on Flower's runtime.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("flwr")

import torch  # noqa: E402
from support.flower import (  # noqa: E402
    Stop,
    assert_same_run,
    run_loopback,
    stop_after_round_3,
    tiny_experiment,
)

from floral.cli import main  # noqa: E402
from floral.engines.flower.store import DiskStore, keep_from, valid_lineage  # noqa: E402
from floral.errors import ConfigError  # noqa: E402
from floral.experiment import resolve_config  # noqa: E402
from floral.run import run_experiment  # noqa: E402

LINEAGE = "0123456789abcdef" * 2


def _config(method: str, *more: str):
    overrides = ["train.rounds=4", "engine.checkpoint_every=2", "engine.eval_every=1", *more]
    return resolve_config(tiny_experiment(method), overrides)


@pytest.mark.parametrize("method", ["floral", "local-adaptor", "fedavg"])
def test_stopped_and_resumed_on_restarted_nodes_equals_the_uninterrupted_local_run(
    tmp_path, method
):
    config = _config(method)
    local = run_experiment(config, tmp_path / "local")
    out, nodes = tmp_path / "flower", tmp_path / "nodes"
    with pytest.raises(Stop):
        run_loopback(config, out, state_dir=nodes, on_round=stop_after_round_3)
    manifest = json.loads((out / "checkpoint" / "manifest.json").read_text())
    assert manifest["round"] == 2
    # The nodes went one round further than the server's checkpoint (when sampled in round 3).
    stored = sorted(p.name for p in nodes.glob("node*/*/client-*/round-*.safetensors"))
    if method != "fedavg":
        assert "round-3.safetensors" in stored

    summary, _ = run_loopback(config, out, state_dir=nodes, resume=True)
    assert_same_run(out, summary, tmp_path / "local", local)
    for path in nodes.glob("node*/*/client-*/round-*.safetensors"):
        assert int(path.stem.split("-")[1]) <= 4


def test_a_new_run_on_nodes_that_kept_an_old_run_starts_afresh(tmp_path):
    config = _config("floral")
    local = run_experiment(config, tmp_path / "local")
    nodes = tmp_path / "nodes"
    run_loopback(config, tmp_path / "first", state_dir=nodes)
    summary, _ = run_loopback(config, tmp_path / "second", state_dir=nodes)
    assert_same_run(tmp_path / "second", summary, tmp_path / "local", local)
    # One folder per run (lineage), beside the node's cached task.
    assert len([p for p in (nodes / "node0").iterdir() if valid_lineage(p.name)]) == 2


def test_resume_needs_nodes_that_keep_their_state_on_disk(tmp_path):
    config = _config("floral", "train.rounds=2")
    run_loopback(config, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"client 0 keeps its private state in memory.*state-dir"):
        run_loopback(config, tmp_path / "run", resume=True)


def test_resume_without_a_checkpoint_stops_before_flower_starts(tmp_path, capsys):
    experiment = tmp_path / "tiny.toml"
    experiment.write_text('[task]\ndataset = "synthetic-mlp"\nshift = "none"\nnum_clients = 4\n')
    out = tmp_path / "out"
    code = main(["run", str(experiment), "--engine", "flower", "--resume", "--quiet",
                 "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume:" in err[0] and "no complete checkpoint" in err[0]
    assert not out.exists()


def test_a_node_keeps_the_versions_a_resumed_server_can_go_back_to(tmp_path):
    store = DiskStore(tmp_path, LINEAGE)
    kept = []
    for round_ in range(1, 8):  # checkpoints every 3 rounds: after rounds 3 and 6
        store.write(0, round_, {"x": torch.tensor([float(round_)])}, keep_from(round_, 3))
        files = (tmp_path / LINEAGE / "client-0").glob("round-*.safetensors")
        kept.append(sorted(int(p.stem.split("-")[1]) for p in files))
    # Rounds 1-3 need nothing before 0; 4-6 need the version of round 3; 7 that of round 6.
    assert kept == [[1], [1, 2], [1, 2, 3], [3, 4], [3, 4, 5], [3, 4, 5, 6], [6, 7]]
    assert store.read(0, 6)["x"].item() == 6.0 and store.read(0, 0) is None
    # A server resumed from round 6 retrains round 7: the old round 7 is replaced.
    store.write(0, 7, {"x": torch.tensor([70.0])}, keep_from(7, 3))
    assert store.read(0, 9)["x"].item() == 70.0
    # Resumed from round 3 (a kill before the checkpoint of 6): later versions are discarded.
    store.write(0, 4, {"x": torch.tensor([40.0])}, keep_from(4, 3))
    assert store.read(0, 100)["x"].item() == 40.0
    assert not list(tmp_path.rglob("round-7.safetensors"))
    assert keep_from(5, 0) == 4  # without regular checkpoints: the round before


def test_a_lineage_must_be_a_plain_name(tmp_path):
    with pytest.raises(ValueError, match="32 hex digits"):
        DiskStore(tmp_path, "../" + LINEAGE[3:])


# Two Ray simulations (10-50 s each).
@pytest.mark.slow
def test_a_flower_simulation_stopped_at_half_and_resumed_equals_an_uninterrupted_run(tmp_path):
    from floral.engines.flower.options import FlowerOptions
    from floral.flower_app import simulate

    pytest.importorskip("ray")
    config = _config("floral", "engine.name=flower")
    local = run_experiment(_config("floral"), tmp_path / "local")
    options = FlowerOptions(round_timeout=300.0, node_timeout=60.0)
    out = tmp_path / "flower"
    with pytest.raises(Stop):  # the ServerApp died; Flower re-raises its exception
        simulate(config, out, options=options, on_round=stop_after_round_3)
    assert json.loads((out / "checkpoint" / "manifest.json").read_text())["round"] == 2
    summary = simulate(config, out, options=options, resume=True)
    assert_same_run(out, summary, tmp_path / "local", local)
    assert list((out / "nodes").glob("*/client-*/round-*.safetensors"))


def test_a_node_restarted_mid_run_with_a_new_id_serves_its_client_from_its_disk(tmp_path):
    from flwr.app import Context, RecordDict
    from support.flower import LoopbackGrid

    from floral.engines.flower.options import FlowerOptions
    from floral.flower_app import client_app, serve

    config = _config("floral", "train.clients_per_round=1.0")
    local = run_experiment(config, tmp_path / "local")
    grid = LoopbackGrid(client_app, config.task.num_clients, tmp_path / "nodes")

    def restart_client_0s_node(result, latest):
        if result.round == 2:  # between rounds 2 and 3: a new process, a new node id
            context = grid.contexts.pop(1000)
            grid.contexts[2000] = Context(run_id=1, node_id=2000, state=RecordDict(),
                                          run_config={}, node_config=dict(context.node_config))

    options = FlowerOptions(round_timeout=5.0, node_timeout=1.0, poll_interval=0.001)
    summary = serve(grid, config, tmp_path / "flower", options, restart_client_0s_node)
    assert_same_run(tmp_path / "flower", summary, tmp_path / "local", local)
    trained = [m.metadata.dst_node_id for m in grid.traffic
               if m.metadata.message_type == "train" and not m.metadata.reply_to_message_id]
    assert trained.count(1000) == 2 and trained.count(2000) == 2
