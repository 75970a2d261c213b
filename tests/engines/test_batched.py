"""Batched client execution (`engine.batch_clients`) against the sequential engine.

The sequential engine is the independent computation: one client at a time, torch autograd and
torch's SGD on the scratch model. The batched engine stacks clients and runs vmap over them,
so its batched matmuls add up in another order; after 2 rounds of a few SGD steps the states
agree to float32 rounding amplified by those steps. Measured: 3e-8 for FedAvg; 7e-6 for
FLoRAL's lora_A (values ~4), where preconditioning divides by B^T B + eps with B still small
and so magnifies rounding; 2e-6 for the local adaptor. TOL (atol 5e-5, rtol 1e-4) leaves a
margin over those and stays far below any real mistake (a wrong batch order, a missed hook or
a wrong lr moves tensors by 1e-3 and more; see the `moved` and preconditioning checks).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from floral.data import ClientData, FederatedTask
from floral.engines.batched import plan_batches
from floral.engines.config import EngineConfig
from floral.engines.local import LocalEngine
from floral.errors import ConfigError
from floral.methods import get_method, method_names
from floral.methods.base import WEIGHT_SUFFIX, ClientJob, ClientUpdate, Method
from floral.methods.fedavg import FedAvg
from floral.train.loop import TrainConfig
from floral.train.objective import get_objective

TOL = {"atol": 5e-5, "rtol": 1e-4}
SIZES = [40, 40, 37, 40, 37, 40, 40, 37]  # IID-style shares: two sizes, one not a batch multiple


def _task() -> FederatedTask:
    generator = torch.Generator().manual_seed(1)
    clients = []
    for k, n in enumerate(SIZES):
        x = torch.randn(n + 10, 12, generator=generator)
        y = (x[:, :3].argmax(dim=1) + k % 2) % 3  # two clusters: labels shifted by one
        clients.append(ClientData(k, k % 2, x[:n], y[:n], x[n:], y[n:]))
    return FederatedTask("toy", "classification", (12,), 3, 2, clients)


def _model(norm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    middle = [nn.BatchNorm1d(16)] if norm else []
    return nn.Sequential(nn.Linear(12, 16), *middle, nn.ReLU(), nn.Linear(16, 3))


def _train(**overrides: float) -> TrainConfig:
    settings = {"rounds": 2, "clients_per_round": 0.75, "batch_size": 8, "lr": 0.05}
    return TrainConfig(**{**settings, **overrides})


def _engine(method, batch_clients: int | str, train: TrainConfig,
            norm: bool = False) -> LocalEngine:
    task = _task()
    model = method.build_model(_model(norm), task)
    config = EngineConfig(eval_every=10**6, batch_clients=batch_clients)
    return LocalEngine(method, task, model, train, config, seed=3)


def _counting(method):
    """The method, counting the client steps that run one by one (not batched)."""
    calls = []
    step = method.client_step

    def counted(*args, **kwargs) -> ClientUpdate:
        calls.append(1)
        return step(*args, **kwargs)

    method.client_step = counted  # on the instance: the class still has the default step
    return method, calls


def _run_pair(name: str, options: dict, train: TrainConfig, batch_clients: int = 4):
    sequential = _engine(get_method(name, options), 0, train)
    method, calls = _counting(get_method(name, options))
    batched = _engine(method, batch_clients, train)
    sequential.run()
    batched.run()
    return sequential, batched, calls


def _assert_states_close(a: LocalEngine, b: LocalEngine, **tol: float) -> None:
    assert a.global_state.keys() == b.global_state.keys()
    for name, value in a.global_state.items():
        torch.testing.assert_close(b.global_state[name], value, **tol, msg=name)
    assert a.private.keys() == b.private.keys()
    for k, state in a.private.items():
        assert state.keys() == b.private[k].keys()
        for name, value in state.items():
            torch.testing.assert_close(b.private[k][name], value, **tol, msg=f"{k}/{name}")


CASES = {
    "fedavg": ("fedavg", {}, {}),
    # Learned router without noise (deterministic); rank 2 takes precondition's solver path;
    # momentum, weight decay and three learning rates exercise the method's SGD groups.
    "floral": (
        "floral",
        {"router": "learned", "noise": 0.0, "rank": 2, "precondition": True},
        {"momentum": 0.9, "weight_decay": 1e-3, "adaptor_lr": 0.1, "router_lr": 0.5},
    ),
    "local-adaptor": ("local-adaptor", {"rank": 1, "precondition": True}, {"momentum": 0.5}),
    # Router noise on: each client's draws from its own generator, as when it trains alone.
    "floral-noise": ("floral", {"noise": 1.0, "rank": 2}, {"router_lr": 0.5}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_batched_matches_sequential_after_two_rounds(case):
    name, options, train = CASES[case]
    sequential, batched, calls = _run_pair(name, options, _train(**train))
    # 6 sampled clients per round in two size groups: at most one singleton runs one by one.
    assert len(calls) <= 2, "the batched path did not run"
    _assert_states_close(sequential, batched, **TOL)
    moved = max((sequential.global_state[n] - v).abs().max().item()
                for n, v in _engine(get_method(name, options), 0, _train()).global_state.items())
    assert moved > 1e-3  # training changed the model by far more than the tolerance


def test_floral_preconditioning_is_applied_when_batched():
    """Without the hook the batched floral run would land elsewhere: the test above would see it."""
    name, options, train = CASES["floral"]
    _, batched, _ = _run_pair(name, options, _train(**train))
    plain, _, _ = _run_pair(name, {**options, "precondition": False}, _train(**train))
    gap = max((batched.global_state[n] - v).abs().max().item()
              for n, v in plain.global_state.items())
    assert gap > 100 * TOL["atol"]


def test_batched_runs_with_router_noise_are_repeatable():
    options = {"router": "learned", "noise": 1.0, "rank": 2}
    first = _engine(get_method("floral", options), 4, _train())
    second = _engine(get_method("floral", options), 4, _train())
    first.run()
    second.run()
    _assert_states_close(first, second, atol=0.0, rtol=0.0)


def test_batchnorm_model_falls_back_to_sequential():
    sequential = _engine(get_method("fedavg"), 0, _train(), norm=True)
    method, calls = _counting(get_method("fedavg"))
    batched = _engine(method, 4, _train(), norm=True)
    sequential.run()
    batched.run()
    assert len(calls) == 2 * 6  # every sampled client of both rounds, one by one
    _assert_states_close(sequential, batched, atol=0.0, rtol=0.0)


class _OwnStep(FedAvg):
    """A method with its own client step: it declares so, and the batched engine leaves it
    alone."""

    batchable = False

    def client_step(self, *args, **kwargs) -> ClientUpdate:  # noqa: ANN002, ANN003
        update = super().client_step(*args, **kwargs)
        update.metrics["own_step"] = 1.0
        return update


class _PythonHook(FedAvg):
    """A backward hook that reads a tensor into Python, which vmap cannot batch."""

    def backward_hook(self, model: nn.Module):  # noqa: ANN201
        def halve_large_gradients() -> None:
            for p in model.parameters():
                if p.grad is not None and p.grad.abs().max().item() > 1.0:
                    p.grad.mul_(0.5)

        return halve_large_gradients


@pytest.mark.parametrize("cls", [_OwnStep, _PythonHook])
def test_unbatchable_methods_fall_back_to_sequential(cls):
    sequential = _engine(cls(), 0, _train())
    method, calls = _counting(cls())
    batched = _engine(method, 4, _train())
    sequential.run()
    batched.run()
    assert len(calls) == 2 * 6
    _assert_states_close(sequential, batched, atol=0.0, rtol=0.0)


def test_plan_batches_groups_equal_sizes_in_balanced_batches():
    task = _task()
    objective = get_objective("classification")
    jobs = [ClientJob({}, {}, task.clients[k], _train(), objective, seed=k)
            for k in range(len(SIZES))]
    batches = plan_batches(jobs, 2)
    assert sorted(job.client for batch in batches for job in batch) == list(range(len(SIZES)))
    for batch in batches:
        assert len(batch) <= 2
        assert len({job.data.num_train for job in batch}) == 1
    # 5 clients of 40 in three batches of at most 2, 3 clients of 37 in two.
    assert sorted(len(b) for b in batches) == [1, 1, 2, 2, 2]
    assert [len(b) for b in plan_batches(jobs, 4)] == [3, 2, 3]  # 5 -> 3 + 2, not 4 + 1


def test_negative_batch_clients_is_a_config_error():
    with pytest.raises(ConfigError, match="engine.batch_clients"):
        _engine(get_method("fedavg"), -1, _train())


@pytest.mark.parametrize("name", method_names())
def test_a_method_declared_batchable_keeps_the_default_client_step(name):
    # The batched engine reproduces the default step; a method that replaces it must say so.
    cls = type(get_method(name))
    replaced = [hook for hook in ("client_step", "train_locally", "local_optimizer")
                if getattr(cls, hook) is not getattr(Method, hook)]
    assert not (cls.batchable and replaced), (name, replaced)


# Batchable methods whose layers the stacked tensor step covers (floral.adapters.stacked), with
# router noise off so that both engines draw nothing. One round of a few SGD steps: batched
# products add up in another order than one client's, which moves the last bits only.
TENSOR_STEP = ["fedavg", "local", "floral", "floral-oracle", "local-adaptor", "fedit",
               "ffa-lora", "fedsa-lora", "flasc", "flocora"]


@pytest.mark.parametrize("name", TENSOR_STEP)
def test_tensor_step_matches_the_sequential_step(name, monkeypatch):
    import floral.engines.batched as batched_module

    vmapped = []
    monkeypatch.setattr(batched_module, "_vmapped_step",
                        lambda *a, **k: vmapped.append(1) or pytest.fail("vmap fallback ran"))
    options = {"noise": 0.0} if name.startswith("floral") else {}
    sequential = _engine(get_method(name, options), 0, _train(rounds=1))
    method, calls = _counting(get_method(name, options))
    batched = _engine(method, 4, _train(rounds=1))
    sequential.run()
    batched.run()
    assert len(calls) <= 1 and not vmapped
    _assert_states_close(sequential, batched, atol=1e-6, rtol=1e-6)


# Every method that declares itself batchable, at its defaults: a learned router draws its
# noise (each client's own draws, as it draws them alone).
BATCHABLE = [name for name in method_names() if get_method(name).batchable]


def _per_example(update: ClientUpdate, name: str, value: torch.Tensor) -> torch.Tensor:
    """An upload's delta over its example count (the client's own change, whose rounding is
    what batching moves); other tensors as they are."""
    if name in update.upload and not name.endswith(WEIGHT_SUFFIX):
        return value / update.num_examples
    return value


@pytest.mark.parametrize("name", BATCHABLE)
def test_batched_uploads_match_the_sequential_uploads(name):
    """Each client's upload, private state, example count and loss, built from the stacked
    tensors (`Method.finish_batch`), against the one-client step from the same state."""
    # An ensemble's model runs on the vmap fallback, which draws its router noise its own way.
    options = {"noise": 0.0} if name == "ensemble" else {}
    sequential = _engine(get_method(name, options), 0, _train())
    batched = _engine(get_method(name, options), 4, _train())
    sequential.run_round()  # round 1 moves routers and private states off their start
    state = sequential.global_state
    private = {k: sequential.private_state(k) for k in range(len(SIZES))}
    alone = sequential.worker.train(2, state, private)
    together = batched.worker.train(2, state, private)
    # 8 clients in batches of at most 4 of equal size: 40, 40 | 40, 40, 40 | 37, 37, 37. An
    # ensemble's weights come from each client's router as loaded, one client at a time.
    stacked = sum(u.batch is not None for u in together.values())
    assert stacked == (0 if name.startswith("ensemble") else 8)
    for k, update in alone.items():
        other = together[k]
        assert (other.num_examples, other.upload.keys(), other.private.keys()) == (
            update.num_examples, update.upload.keys(), update.private.keys())
        for kind in ("upload", "private"):
            for n, value in getattr(update, kind).items():
                mine = getattr(other, kind)[n]
                assert (mine.shape, mine.dtype) == (value.shape, value.dtype), (k, n)
                torch.testing.assert_close(_per_example(other, n, mine),
                                           _per_example(update, n, value),
                                           atol=1e-6, rtol=1e-6, msg=f"{k}/{n}")
        assert other.metrics["train_loss"] == pytest.approx(update.metrics["train_loss"],
                                                            abs=1e-6)


def test_a_non_finite_batched_upload_is_dropped_naming_its_client(caplog):
    """The batch check fails, each row is checked alone: the round drops only that client,
    for the reason `check_upload` gives."""
    method = get_method("floral", {"noise": 0.0})
    engine = _engine(method, "auto", _train())
    finish, poisoned = method.finish_batch, []

    def nan_in_first_row(*args, **kwargs) -> list[ClientUpdate]:
        updates = finish(*args, **kwargs)
        if not poisoned:
            poisoned.append(args[1][0].client)
            updates[0].upload["2.lora_A"][0, 0, 1] = float("nan")  # a view into the batch
        return updates

    method.finish_batch = nan_in_first_row
    with caplog.at_level("WARNING", logger="floral"):
        result = engine.run_round()
    (client,) = poisoned
    reason = "'2.lora_A' has NaN or infinite values"
    assert result.dropped == {client: reason}
    assert result.applied == len(result.clients) - 1
    assert f"dropped the reply of client {client}: {reason}" in caplog.text


def test_the_default_batches_every_sampled_client_of_a_size():
    assert EngineConfig().batch_clients == "auto"
    method, calls = _counting(get_method("fedavg"))
    engine = LocalEngine(method, _task(), _model(), _train(clients_per_round=1.0), seed=3)
    engine.run_round()
    assert not calls  # 8 clients of two sizes: two batches, none one by one


class _ConvNet(nn.Module):
    """A layer that only the vmap fallback batches."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 2, 3)
        self.head = nn.Linear(20, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x.unsqueeze(1)).flatten(1))


@pytest.mark.parametrize(("setting", "one_by_one"), [("auto", 12), (4, 0), (0, 12)])
def test_auto_leaves_the_vmap_fallback_to_an_explicit_batch_size(setting, one_by_one):
    method, calls = _counting(get_method("fedavg"))
    task = _task()
    torch.manual_seed(0)
    config = EngineConfig(eval_every=10**6, batch_clients=setting)
    LocalEngine(method, task, _ConvNet(), _train(), config, seed=3).run()
    assert len(calls) == one_by_one or (one_by_one == 0 and len(calls) <= 2)


@pytest.mark.parametrize("value", ["all", "8", 2.5, True])
def test_batch_clients_takes_a_count_or_auto(value):
    with pytest.raises(ConfigError, match="^engine.batch_clients: "):
        _engine(get_method("fedavg"), value, _train())
