"""pFedLoRA (heterogeneous models, shared adapter), FDLoRA (dual LoRA), label-skew partitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from support.results import assert_final_accuracy_is_the_saved_states, assert_trained
from support.steps import client_step, server_update
from torch import nn

from floral.data import ClientData, FederatedTask, TaskConfig, build_task
from floral.data.partition import (
    class_sets,
    dirichlet_proportions,
    set_proportions,
    split_by_proportions,
)
from floral.engines.local import LocalEngine
from floral.errors import ConfigError
from floral.experiment import resolve_config
from floral.methods import WEIGHT_SUFFIX, get_method
from floral.methods.base import ClientJob
from floral.methods.fdlora import FUSION_WEIGHTS, GLOBAL_HALF, PERSONAL_HALF, fusion_objective
from floral.models.hetero import HETERO_WIDTHS, HeteroCNN, HeteroFamily
from floral.models.networks import LinearModel
from floral.run import run_experiment
from floral.train.loop import TrainConfig
from floral.train.objective import get_objective
from floral.train.optim import ServerOptimizer
from floral.train.state import StateSlots

IMAGE = (1, 8, 8)


def image_task(num_clients: int = 5, samples: int = 24, seed: int = 0) -> FederatedTask:
    g = torch.Generator().manual_seed(seed)
    clients = [
        ClientData(
            k,
            0,
            torch.randn(samples + 3 * k, *IMAGE, generator=g),
            torch.randint(0, 10, (samples + 3 * k,), generator=g),
            torch.randn(8, *IMAGE, generator=g),
            torch.randint(0, 10, (8,), generator=g),
        )
        for k in range(num_clients)
    ]
    return FederatedTask("toy", "classification", IMAGE, 10, 1, clients)


def pfedlora_setup(num_clients: int = 5):
    task = image_task(num_clients)
    method = get_method("pfedlora", {"rank": 2})
    torch.manual_seed(0)
    model = method.build_model(HeteroFamily(IMAGE, 10), task)
    return method, task, model


def split_names(method, model) -> tuple[list[str], list[str]]:
    roles = method.roles(model)
    return (
        [n for n, r in roles.items() if r.value == "global"],
        [n for n, r in roles.items() if r.value == "private"],
    )


# ------------------------------------------------------------------ the CNN family


def test_family_architectures_differ_in_width_and_depth_and_share_neck_and_head():
    x = torch.randn(3, *IMAGE)
    models = [HeteroCNN(i, IMAGE, 10) for i in range(len(HETERO_WIDTHS))]
    sizes = [sum(p.numel() for p in m.trunk.parameters()) for m in models]
    convs = [sum(isinstance(m, nn.Conv2d) for m in model.trunk) for model in models]
    assert len(set(sizes)) == len(models) and len(set(convs)) >= 3
    assert {tuple(m.head.weight.shape) for m in models} == {(10, 64)}
    assert all(m(x).shape == (3, 10) for m in models)


def test_family_refuses_to_run_without_an_architecture():
    with pytest.raises(ConfigError, match="hetero-cnn"):
        HeteroFamily(IMAGE, 10)(torch.randn(1, *IMAGE))


def test_family_routes_each_client_through_its_own_trunk():
    method, task, model = pfedlora_setup()
    slots = StateSlots(model)
    _, private_names = split_names(method, model)
    initial = slots.snapshot(private_names)
    for k in (0, 3, 7 % 5):
        private = method.init_private(initial, task.clients[k])
        assert int(private["arch"]) == k % 5
        trunks = {n.split(".")[1] for n in private if n.startswith("trunks.")}
        assert trunks == {str(k % 5)}


# ------------------------------------------------------------------ pFedLoRA


def fired_gradients(model: nn.Module) -> tuple[set[str], list]:
    """Names of the parameters that received a nonzero gradient, recorded by hooks."""
    fired: set[str] = set()
    handles = []
    for name, parameter in model.named_parameters():
        def hook(grad, name=name):  # noqa: ANN001, ANN202
            if grad.abs().sum() > 0:
                fired.add(name)
        handles.append(parameter.register_hook(hook))
    return fired, handles


@pytest.mark.parametrize("phase", ["model", "adapter"])
def test_pfedlora_phase_trains_only_its_part(phase):
    method, task, model = pfedlora_setup()
    slots = StateSlots(model)
    global_names, private_names = split_names(method, model)
    client = task.clients[3]
    private = method.init_private(slots.snapshot(private_names), client)
    slots.load(private)
    with torch.no_grad():  # a nonzero adapter, so both parts get gradients when trained
        for name in global_names:
            slots.tensors[name].add_(0.1 * torch.randn_like(slots.tensors[name]))
    before = {n: t.detach().clone() for n, t in slots.tensors.items()}
    fired, handles = fired_gradients(model)
    config = TrainConfig(lr=0.1, batch_size=8)
    generator = torch.Generator().manual_seed(0)
    job = ClientJob({}, {}, client, config, get_objective("classification"), seed=0)
    method.train_phase(slots, job, generator, phase)
    for handle in handles:
        handle.remove()

    adaptor = set(global_names)
    own = {n for n in private if n != "arch" and n in dict(model.named_parameters())}
    trained = adaptor if phase == "adapter" else own
    changed = {n for n, t in slots.tensors.items() if not torch.equal(t, before[n])}
    assert fired == trained  # frozen parts get no gradient at all
    assert changed == trained  # ... and keep their values; the other trunks are untouched


def test_pfedlora_uploads_only_the_adapter_and_the_server_takes_its_weighted_mean():
    method, task, model = pfedlora_setup()
    slots = StateSlots(model)
    global_names, private_names = split_names(method, model)
    global_state = slots.snapshot(global_names)
    initial = slots.snapshot(private_names)
    config = TrainConfig(lr=0.1, batch_size=8)
    uploads, adapters, counts = [], [], []
    for k in (1, 2, 4):  # three different architectures
        client = task.clients[k]
        update = client_step(
            method, slots, global_state, method.init_private(initial, client), client, config,
            "classification", seed=k,
        )
        uploads.append(update.upload)
        adapters.append(slots.snapshot(global_names))  # the adapter this client trained
        counts.append(client.num_train)
        expected_keys = set(global_names) | {n + WEIGHT_SUFFIX for n in global_names}
        assert set(update.upload) == expected_keys
        assert not any(n.startswith(("trunks.", "neck.base", "head.base")) for n in update.upload)

    new = server_update(method, global_state, uploads, ServerOptimizer(), model)
    total = sum(counts)
    for name in global_names:
        mean = sum(n * a[name] for n, a in zip(counts, adapters, strict=True)) / total
        torch.testing.assert_close(new[name], mean, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ FDLoRA


def fdlora_setup(options: dict | None = None):
    task = image_task(4)
    method = get_method("fdlora", {"rank": 2, **(options or {})})
    torch.manual_seed(0)
    model = method.build_model(LinearModel(math.prod(IMAGE), 10), task)
    return method, task, model


def test_fdlora_fuses_the_two_lora_outputs_with_the_fusion_weights():
    method, _, model = fdlora_setup()
    layer = model.fc
    with torch.no_grad():
        for factor in ("lora_A", "lora_B"):
            for half in (GLOBAL_HALF, PERSONAL_HALF):
                tensor = getattr(getattr(layer.parametrizations, factor), half)
                tensor.copy_(torch.randn_like(tensor))
        model.floral_router.fixed.copy_(torch.tensor([0.7, -0.2]))
    model.eval()
    x = torch.randn(5, *IMAGE)
    flat = x.flatten(1)
    expected = flat @ layer.base.weight.T + layer.base.bias
    for half, weight in ((GLOBAL_HALF, 0.7), (PERSONAL_HALF, -0.2)):
        a = getattr(layer.parametrizations.lora_A, half)[0]  # (r, in)
        b = getattr(layer.parametrizations.lora_B, half)[0]  # (r, out), B stored transposed
        expected = expected + weight * (flat @ a.T) @ b
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_fdlora_never_uploads_the_personal_lora_and_learns_its_fusion_weights():
    method, task, model = fdlora_setup()
    config = TrainConfig(rounds=2, clients_per_round=1.0, lr=0.1, batch_size=8)
    engine = LocalEngine(method, task, model, config)
    seen: list[set[str]] = []
    real_update = method.server_update

    def recording(state, uploads, optimizer):  # noqa: ANN001, ANN202
        seen.extend(set(u) for u in uploads)
        return real_update(state, uploads, optimizer)

    method.server_update = recording  # type: ignore[method-assign]
    initial = engine.private_state(0)
    engine.run()

    assert len(seen) == 2 * len(task.clients)
    for keys in seen:
        assert keys and all(GLOBAL_HALF in k for k in keys)
        assert not any(PERSONAL_HALF in k or FUSION_WEIGHTS in k for k in keys)
    for k in range(len(task.clients)):
        private = engine.private[k]
        assert not torch.equal(private[FUSION_WEIGHTS], initial[FUSION_WEIGHTS])
        personal = [n for n in private if n.endswith(PERSONAL_HALF)]
        assert personal and any(not torch.equal(private[n], initial[n]) for n in personal)


def test_fdlora_fusion_search_never_worsens_its_objective():
    method, task, model = fdlora_setup({"fusion_samples": 16, "fusion_l1": 0.05})
    client = task.clients[2]
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    current = torch.tensor([0.5, 0.5])
    job = ClientJob({}, {}, client, TrainConfig(), get_objective("classification"), seed=0)
    best = method.search_fusion(model, current, job, torch.Generator().manual_seed(3))
    # The same few samples, drawn independently of the search.
    few = torch.randperm(client.num_train, generator=torch.Generator().manual_seed(3))[:16]
    x, y = client.x_train[few], client.y_train[few]
    loss = get_objective("classification").loss
    score = fusion_objective(model, best, x, y, loss, 0.05)
    assert score <= fusion_objective(model, current, x, y, loss, 0.05) + 1e-6


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"bias": True}, "method.bias"),
        ({"fusion_init": [1.0]}, "method.fusion_init"),
        ({"fusion_candidates": 0}, "method.fusion_candidates"),
        ({"fusion_sigma": -1.0}, "method.fusion_sigma"),
    ],
)
def test_fdlora_bad_options_stop_with_a_one_line_error(options, key):
    with pytest.raises(ConfigError, match=key) as error:
        fdlora_setup(options)
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------ label skew


def test_classes_per_client_gives_each_client_exactly_its_classes():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 50)
    sets = class_sets(10, 12, 3, rng)
    shares = split_by_proportions(labels, set_proportions(sets, 10), rng)
    dealt = np.concatenate(shares)
    assert len(dealt) == len(np.unique(dealt))  # no sample twice
    held = np.unique(sets)
    assert set(dealt.tolist()) == set(np.flatnonzero(np.isin(labels, held)).tolist())
    for share, classes in zip(shares, sets, strict=True):
        assert len(set(classes.tolist())) == 3
        assert set(labels[share].tolist()) == set(classes.tolist())


def test_dirichlet_shares_follow_their_proportions():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, size=3000)
    proportions = dirichlet_proportions(10, 20, 0.3, rng)
    shares = split_by_proportions(labels, proportions, rng)
    dealt = np.concatenate(shares)
    assert sorted(dealt.tolist()) == list(range(len(labels)))  # every sample exactly once
    per_class = np.bincount(labels, minlength=10)
    counts = np.stack([np.bincount(labels[s], minlength=10) for s in shares], axis=1)
    assert np.abs(counts - proportions * per_class[:, None]).max() < 1.0 + 1e-9


def test_label_skew_tasks_skew_train_and_test_alike():
    common = {"dataset": "digits", "num_clients": 10, "num_clusters": 1}
    task = build_task(TaskConfig(shift="classes-per-client", classes_per_client=2, **common), 0)
    for client in task.clients:
        train, test = set(client.y_train.tolist()), set(client.y_test.tolist())
        assert len(train) == 2 and test <= train
    skewed = build_task(TaskConfig(shift="dirichlet", dirichlet_alpha=0.1, **common), 0)
    flat = build_task(TaskConfig(shift="dirichlet", dirichlet_alpha=100.0, **common), 0)

    def top_share(t: FederatedTask) -> float:  # mean share of each client's commonest class
        return float(np.mean([np.bincount(c.y_train).max() / c.num_train for c in t.clients]))

    assert top_share(skewed) > 0.5 > top_share(flat)


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"shift": "dirichlet", "dirichlet_alpha": 0.0}, "task.dirichlet_alpha"),
        ({"shift": "dirichlet", "dirichlet_alpha": float("inf")}, "task.dirichlet_alpha"),
        ({"shift": "classes-per-client", "classes_per_client": 0}, "task.classes_per_client"),
        ({"shift": "classes-per-client", "classes_per_client": 11}, "task.classes_per_client"),
    ],
)
def test_bad_label_skew_settings_stop_with_a_one_line_error(settings, key):
    with pytest.raises(ConfigError, match=key) as error:
        build_task(TaskConfig(dataset="fashion-mnist", data_dir="/nonexistent", **settings), 0)
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------ end to end


@pytest.mark.parametrize(
    ("method", "model"),
    [
        # Half the clients sampled: some architectures have no private tensors saved yet,
        # and the saved state must load back all the same.
        ("pfedlora", "hetero-cnn"),
        ("pfedlora", "mlp"),  # one architecture for all: the adapter on every layer
        ("local-hetero", "hetero-cnn"),
        ("fdlora", "mlp"),
    ],
)
def test_new_methods_run_two_rounds_end_to_end(tmp_path, method, model):
    config = resolve_config(
        {
            "name": f"hetero-{method}",
            "task": {
                "dataset": "digits", "shift": "dirichlet", "dirichlet_alpha": 0.5,
                "num_clients": 10, "num_clusters": 1,
            },
            "model": {"name": model, "hidden": [32]},
            "method": {"name": method},
            "train": {"rounds": 2, "clients_per_round": 0.5, "lr": 0.05},
            "engine": {"eval_every": 1},
        }
    )
    summary = run_experiment(config, tmp_path / method)
    assert summary.rounds == 2
    assert (summary.bytes_up == 0) == (method == "local-hetero")
    assert (tmp_path / method / "state.safetensors").exists()
    assert_trained(summary)
    assert_final_accuracy_is_the_saved_states(config, summary)
