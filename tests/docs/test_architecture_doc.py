"""docs/architecture.md's own method runs as written, and its server state is checkpointed."""

from __future__ import annotations

import re

import torch
from support import ROOT

from floral.engines import LocalEngine
from floral.methods import get_method
from floral.methods.base import ServerState

DOC = ROOT / "docs" / "architecture.md"


def _run_doc_example() -> dict:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    namespace: dict = {}
    exec(compile(blocks[0], str(DOC), "exec"), namespace)  # noqa: S102
    return namespace


def test_a_method_of_ones_own_keeps_its_server_state_and_ramps_the_update():
    doc = _run_doc_example()
    engine: LocalEngine = doc["engine"]
    assert int(engine.state.method_state["rounds"]) == 3
    assert doc["losses"].seen == [(1, 4), (2, 4), (3, 4)]  # its observer saw every round
    assert int(engine.state_dict()["method/rounds"]) == 3  # checkpointed with the run

    # Independently: plain FedAvg whose server SGD takes lr r/5 in round r is the same ramp.
    task, fedavg = engine.task, get_method("fedavg")
    reference = LocalEngine(fedavg, task, fedavg.build_model(torch.nn.Linear(8, 2), task),
                            engine.train, seed=engine.seed)
    initial = ServerState({k: v.clone() for k, v in engine.worker.initial.global_state.items()})
    reference.state = initial  # the doc's model as it was built
    for round_ in range(1, 4):
        reference.server_optimizer.lr = min(1.0, round_ / 5)
        reference.run_round()
    for name, tensor in engine.global_state.items():
        torch.testing.assert_close(tensor, reference.global_state[name], rtol=1e-6, atol=1e-7)
    assert not torch.equal(engine.global_state["weight"], initial.global_state["weight"])


def test_the_line_counts_are_the_trees():
    import sys

    sys.path.insert(0, str(ROOT))
    from scripts import architecture_counts

    text = DOC.read_text()
    assert architecture_counts.refreshed(text) == text, (
        "docs/architecture.md's line counts are stale: python scripts/architecture_counts.py "
        "--write")
