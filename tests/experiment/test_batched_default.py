"""The batched default (`engine.batch_clients = "auto"`) on the shipped configs: every sampled
client of the paper's synthetic settings trains in one batch, none one by one."""

from __future__ import annotations

import pytest
from support import ROOT

from floral.experiment import build_engine, load_config


@pytest.mark.parametrize("config", ["synthetic-linear", "synthetic-mlp"])
@pytest.mark.parametrize("method", ["fedavg", "floral", "floral-oracle", "local-adaptor"])
def test_the_synthetic_configs_train_their_clients_together(config, method):
    experiment = load_config(ROOT / "configs" / f"{config}.toml", [f"method.name={method}"])
    assert experiment.engine.batch_clients == "auto"
    engine, task = build_engine(experiment)
    alone = []
    step = engine.method.client_step
    engine.method.client_step = lambda *a, **k: alone.append(1) or step(*a, **k)  # type: ignore[method-assign]
    private = {k: engine.local.private_state(k) for k in range(len(task.clients))}
    updates = engine.worker.train(1, engine.global_state, private)
    batches = {id(update.batch) for update in updates.values() if update.batch is not None}
    assert not alone and len(batches) == 1 and len(updates) == len(task.clients)
