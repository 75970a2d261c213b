"""Every capability a method declares holds, checked on its real client steps and server.

Aggregation policies (floral.engines.aggregation) rely on what a method offers; a false
declaration would let a policy run that silently changes the method's result. Each test takes
a round of real uploads of every registered method and checks, for the methods that declare
a capability, the property the policies rely on, against the method's own server update on
the uploads as they came. (`batchable` is checked in test_batched.py: the batched step equals
the sequential one.) The last test shows each check fails on methods that do not offer it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import torch

from floral.engines.aggregation import aggregation_for
from floral.errors import ConfigError
from floral.experiment import build_engine, resolve_config
from floral.methods import get_method, method_names
from floral.methods.base import WEIGHT_SUFFIX, Capability, ServerState, sum_uploads
from floral.train import TrainConfig
from floral.train.optim import build_server_optimizer

TensorDict = dict[str, torch.Tensor]


# Methods shown in the setting that makes them what they are: ranks differing per client.
_OPTIONS: dict[str, dict[str, Any]] = {
    "hetlora": {"ranks": [1, 2, 4, 4], "rank": 4},
    "flora": {"rank_tiers": [1, 2], "rank": 2},
}


def _experiment(method: str) -> dict[str, Any]:
    return {
        "name": f"capabilities-{method}", "seed": 3,
        "task": {"dataset": "synthetic-mlp", "shift": "none", "num_clients": 4,
                 "num_clusters": 2, "samples_per_client": 40},
        "model": {"name": "mlp", "hidden": [16]},
        "method": {"name": method, **_OPTIONS.get(method, {})},
        "train": {"rounds": 2, "clients_per_round": 1.0, "batch_size": 8, "lr": 0.05,
                  "router_lr": 0.5},
    }


_ROUNDS: dict[str, tuple[Any, ServerState, list[TensorDict], list[int]]] = {}


def _round(method: str) -> tuple[Any, ServerState, list[TensorDict], list[int]]:
    """(engine, server state, the uploads of round 2, their clients' examples), once each."""
    if method not in _ROUNDS:
        engine, task = build_engine(resolve_config(_experiment(method)))
        engine.run_round()  # round 1: routers and private states leave their initial values
        clients = list(range(len(task.clients)))
        private = {k: engine.local.private_state(k) for k in clients}
        updates = engine.worker.train(2, engine.global_state, private)
        uploads = [updates[k].upload for k in clients]
        _ROUNDS[method] = (engine, engine.state, uploads,
                           [updates[k].num_examples for k in clients])
    return _ROUNDS[method]


def _server(engine: Any, state: ServerState, uploads: Sequence[Mapping[str, torch.Tensor]]
            ) -> TensorDict:
    new = engine.method.server_update(state, list(uploads),
                                      build_server_optimizer(engine.train))
    return new.global_state


def _same(got: TensorDict, want: TensorDict) -> bool:
    return got.keys() == want.keys() and all(
        torch.allclose(got[k].float(), want[k].float(), rtol=1e-5, atol=1e-6) for k in want)


def _mean_as_one(uploads: Sequence[Mapping[str, torch.Tensor]]) -> TensorDict:
    """The uploads' weighted mean delta as one upload of weight 1: what a robust rule or
    central DP hands the server in place of the uploads."""
    total = sum_uploads(uploads)
    one: TensorDict = {}
    for name, value in total.items():
        if not name.endswith(WEIGHT_SUFFIX):
            one[name] = value / total[name + WEIGHT_SUFFIX]
            one[name + WEIGHT_SUFFIX] = torch.ones_like(total[name + WEIGHT_SUFFIX])
    return one


def _summable(uploads: Sequence[Mapping[str, torch.Tensor]]) -> bool:
    """Whether the uploads add up element-wise: the same names and shapes."""
    first = uploads[0]
    return all(u.keys() == first.keys() and all(u[n].shape == first[n].shape for n in u)
               for u in uploads)


def sum_only(method: str) -> bool:
    engine, state, uploads, _ = _round(method)
    return _summable(uploads) and _same(_server(engine, state, [sum_uploads(uploads)]),
                                        _server(engine, state, uploads))


def mean_per_tensor(method: str) -> bool:
    engine, state, uploads, _ = _round(method)
    scalar = all(u[n].numel() == 1 for u in uploads for n in u if n.endswith(WEIGHT_SUFFIX))
    return scalar and _summable(uploads) and _same(_server(engine, state, [_mean_as_one(uploads)]),
                            _server(engine, state, uploads))


def mean_per_part(method: str) -> bool:
    """Weights per part are n times a mixture (they add up to n over the parts), and the server
    takes the per-part weighted mean, whatever the total weight."""
    engine, state, uploads, examples = _round(method)
    if not _summable(uploads):
        return False
    for upload, n in zip(uploads, examples):
        for name, weight in upload.items():
            parts = name.endswith(WEIGHT_SUFFIX) and weight.numel() > 1
            if parts and not torch.allclose(weight.sum(), torch.tensor(float(n))):
                return False
    return _same(_server(engine, state, [_mean_as_one(uploads)]), _server(engine, state, uploads))


CHECKS = {
    Capability.SUM_ONLY: sum_only,
    Capability.MEAN_PER_TENSOR: mean_per_tensor,
    Capability.MEAN_PER_PART: mean_per_part,
}


@pytest.mark.parametrize("capability", list(CHECKS), ids=lambda c: c.value)
@pytest.mark.parametrize("method", method_names())
def test_a_declared_capability_holds(method, capability):
    if capability not in get_method(method).offers():
        pytest.skip(f"{method} does not declare {capability.value}")
    assert CHECKS[capability](method), f"{method} declares {capability.value} falsely"


@pytest.mark.parametrize(("method", "capability"), [
    ("flora", Capability.SUM_ONLY),          # stacks each upload's factors
    ("hetlora", Capability.SUM_ONLY),        # pads each upload to its rank
    ("floral-seeded", Capability.SUM_ONLY),  # clusters the uploads when it seeds
    ("floral", Capability.MEAN_PER_TENSOR),  # a weight per adaptor
    ("flora", Capability.MEAN_PER_PART),     # factors, not deltas
    ("floral-em", Capability.MEAN_PER_TENSOR),
])
def test_the_checks_catch_a_false_declaration(method, capability):
    # Each would-be declaration fails its check: the checks can tell.
    assert capability not in get_method(method).offers()
    assert not CHECKS[capability](method)


def test_every_method_declares_explicitly_and_defaults_offer_nothing():
    from floral.methods.base import Method

    assert Method.offers() == frozenset()
    for name in method_names():
        cls = type(get_method(name))
        for flag in ("batchable", "plain_mean", "mixture_mean", "secure_sum"):
            # Declared in the class itself or an ancestor below Method, never Method's default.
            owners = [c for c in cls.__mro__ if flag in vars(c)]
            assert owners[0] is not Method, (name, flag)


@pytest.mark.parametrize(("method", "settings", "words"), [
    ("floral", {"aggregation": "median"}, "train.aggregation: 'median' needs uploads combined by"
                                          " a mean with one weight per tensor; floral"),
    ("flora", {"dp_clip": 1.0}, "train.dp_clip: differential privacy needs uploads"),
    ("flora", {"dp_clip": 1.0, "dp_mode": "local"}, "train.dp_clip: differential privacy"),
    ("fedavg", {"dp_clip": 1.0, "aggregation": "median"}, "does not combine with aggregation"),
])
def test_impossible_policies_are_refused_at_build_time_in_one_line(method, settings, words):
    with pytest.raises(ConfigError) as error:
        aggregation_for(TrainConfig(**settings), get_method(method), num_clients=10)
    assert words in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(("method", "settings", "words"), [
    ("hetlora", {"clients_per_round": 0.5},
     "flower.secagg: hetlora reads each client's upload on its own"),
    ("fedavg", {"aggregation": "median", "clients_per_round": 0.5},
     "flower.secagg: train.aggregation = 'median'"),
    ("fedavg", {"dp_clip": 1.0, "clients_per_round": 0.5},
     "flower.secagg: central differential privacy"),
    ("fedavg", {"clients_per_round": 0.1}, "flower.secagg: a sum hides nothing"),
])
def test_secure_aggregation_refuses_what_needs_each_upload(method, settings, words):
    with pytest.raises(ConfigError) as error:
        aggregation_for(TrainConfig(**settings), get_method(method), num_clients=10,
                        secure=True)
    assert words in str(error.value) and "\n" not in str(error.value)
    # Local DP noises on the client: the sum stays all the server needs.
    aggregation_for(TrainConfig(dp_clip=1.0, dp_mode="local", clients_per_round=0.5),
                    get_method("fedavg"), 10, secure=True)
