"""Node-local data on a real deployment: a SuperLink and two SuperNodes on 127.0.0.1, each
SuperNode with its own `data-path` folder, and `flwr run` of the example app.

Every Python process a node starts (its ClientApp processes, its warm worker) records each
file it opens, through an audit hook installed by a `sitecustomize` module on that node's
PYTHONPATH: no node opens the other's folder. The run ends with the numbers of the local
engine on the task the test assembles from the same files, and no message a node sent holds a
router tensor (the nodes' audit files). One round: about a minute here, so `-m slow`.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

pytest.importorskip("flwr")
if shutil.which("flower-superlink") is None or shutil.which("flower-supernode") is None:
    pytest.skip("flower-superlink / flower-supernode not on PATH", allow_module_level=True)

from support.data import client_arrays, expected_task, write_node  # noqa: E402
from support.federation import Federation  # noqa: E402
from support.flower import APP, app_experiment  # noqa: E402

from floral.experiment import build_engine  # noqa: E402

SITECUSTOMIZE = """
import os, sys
_log = open(os.environ["FLORAL_TEST_OPEN_LOG"], "a", buffering=1)
def _opened(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _log.write(os.path.abspath(os.fsdecode(args[0])) + "\\n")
sys.addaudithook(_opened)
"""


# About a minute on this shared machine (two SuperNodes, fresh ClientApp processes).
@pytest.mark.slow
def test_supernodes_read_only_their_own_data_folders(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    clients = [client_arrays(k) for k in range(2)]
    folders = [write_node(tmp_path / f"site{k}", clients[k]) for k in range(2)]
    opens = [tmp_path / f"node{k}-opens.txt" for k in range(2)]
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
    federation = Federation(
        tmp_path,
        num_nodes=2,
        warm_nodes=frozenset({1}),
        node_configs={k: f'data-path="{folders[k]}"' for k in range(2)},
        node_envs={
            k: {"PYTHONPATH": path, "FLORAL_TEST_OPEN_LOG": str(opens[k])} for k in range(2)
        },
    )
    out = tmp_path / "results"
    run_config = (
        f'output.dir="{out}" task.dataset="fashion-mnist" task.shift="none" '
        'task.num_clients=2 model.hidden="[8]" method.name="floral" train.rounds=1 '
        'engine.eval_every=1 overrides="task.data_dir=/nonexistent/the-server-has-no-data" '
        "flower.round-timeout=300.0 flower.node-timeout=120.0"
    )
    with federation:
        done = federation.run(APP, run_config)
    assert done.returncode == 0, done.stdout + done.stderr

    config = app_experiment(run_config)
    engine, _ = build_engine(config, expected_task(clients))
    engine.run()
    expected = engine.evaluate()
    final = json.loads((out / "summary.json").read_text())["final"]
    for key, value in expected.items():
        assert final[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key

    for k, folder in enumerate(folders):
        opened = set(opens[k].read_text().splitlines())
        assert {str(folder / name) for name in clients[k]} <= opened  # the hook saw its reads
        other = str(folders[1 - k])
        assert not [p for p in opened if p == other or p.startswith(other + os.sep)], k
        for line in federation.audits[k].read_text().splitlines():
            for record in json.loads(line)["sent"].values():
                assert not [name for name in record if "router" in name]
