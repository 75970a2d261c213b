"""Server aggregation against weighted means computed by hand."""

from __future__ import annotations

import copy

import torch
from support.steps import client_step, server_update
from torch import nn

from floral.adapters import adaptor_parameter_names
from floral.data import ClientData, FederatedTask
from floral.methods import WEIGHT_SUFFIX, get_method, weighted_mean_delta
from floral.methods.base import split_roles
from floral.train import StateSlots, TrainConfig
from floral.train.optim import ServerOptimizer


def test_weighted_mean_delta_by_hand():
    u1 = {"w": torch.tensor([2.0, 4.0]) * 3, "w" + WEIGHT_SUFFIX: torch.tensor(3.0)}
    u2 = {"w": torch.tensor([-1.0, 1.0]) * 1, "w" + WEIGHT_SUFFIX: torch.tensor(1.0)}
    delta = weighted_mean_delta([u1, u2])
    expected = (3 * torch.tensor([2.0, 4.0]) + 1 * torch.tensor([-1.0, 1.0])) / 4
    torch.testing.assert_close(delta["w"], expected)
    assert set(delta) == {"w"}


def test_per_adaptor_weights_and_unused_adaptor_gets_zero_update():
    # Adaptor axis first: weights (C, 1); adaptor 2 has zero weight everywhere.
    d1, d2 = torch.randn(3, 4), torch.randn(3, 4)
    w1, w2 = torch.tensor([[2.0], [1.0], [0.0]]), torch.tensor([[1.0], [3.0], [0.0]])
    delta = weighted_mean_delta(
        [{"a": w1 * d1, "a" + WEIGHT_SUFFIX: w1}, {"a": w2 * d2, "a" + WEIGHT_SUFFIX: w2}]
    )
    for c in range(2):
        want = (w1[c, 0] * d1[c] + w2[c, 0] * d2[c]) / (w1[c, 0] + w2[c, 0])
        torch.testing.assert_close(delta["a"][c], want)
    assert torch.equal(delta["a"][2], torch.zeros(4))


def _client(k: int, cluster: int, n: int) -> ClientData:
    g = torch.Generator().manual_seed(k)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    return ClientData(k, cluster, x, y, x[:4], y[:4])


def _task(clients: list[ClientData]) -> FederatedTask:
    return FederatedTask("toy", "classification", (6,), 3, 2, clients)


def test_floral_aggregation_equals_hand_computed_pi_weighted_means():
    torch.manual_seed(0)
    clients = [_client(0, 0, 12), _client(1, 1, 7)]
    method = get_method("floral", {"rank": 2, "noise": 0.0, "precondition": False})
    model = method.build_model(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)),
                               _task(clients))
    slots = StateSlots(model)
    global_names, private_names = split_roles(method.roles(model))
    assert not any(n.startswith("floral_router") for n in global_names)
    global_state = slots.snapshot(global_names)
    # Distinct, fixed routers: router lr 0 keeps pi constant during the local epoch.
    logits = [torch.tensor([1.5, -0.5]), torch.tensor([-1.0, 0.7])]
    config = TrainConfig(batch_size=4, lr=0.05, router_lr=0.0)
    uploads, trained = [], []
    for client, logit in zip(clients, logits):
        update = client_step(
            method, slots, global_state, {"floral_router.logits": logit}, client, config,
            "classification", seed=client.client_id,
        )
        assert not any(k.startswith("floral_router") for k in update.upload)
        uploads.append(update.upload)
        trained.append(copy.deepcopy(dict(model.named_parameters())))
    new = server_update(method, global_state, uploads, ServerOptimizer("sgd", lr=1.0), model)

    adaptor_names = set(adaptor_parameter_names(model))
    assert adaptor_names and adaptor_names <= set(global_names)
    pis = [torch.softmax(logit, dim=0) for logit in logits]
    ns = [c.num_train for c in clients]
    for name in global_names:
        thetas = [t[name].detach() for t in trained]
        if name in adaptor_names:
            for c in range(2):
                w = [n * pi[c] for n, pi in zip(ns, pis)]
                want = sum(wk * th[c] for wk, th in zip(w, thetas)) / sum(w)
                torch.testing.assert_close(new[name][c], want, rtol=1e-5, atol=1e-6)
        else:
            want = sum(n * th for n, th in zip(ns, thetas)) / sum(ns)
            torch.testing.assert_close(new[name], want, rtol=1e-5, atol=1e-6)


def test_fedavg_upload_holds_every_global_tensor_and_its_weight():
    clients = [_client(0, 0, 10)]
    method = get_method("fedavg")
    model = nn.Linear(6, 3)
    slots = StateSlots(model)
    state = slots.snapshot(["weight", "bias"])
    update = client_step(method, slots, state, {}, clients[0], TrainConfig(batch_size=5),
                                "classification", seed=1)
    assert set(update.upload) == {"weight", "bias", "weight" + WEIGHT_SUFFIX,
                                  "bias" + WEIGHT_SUFFIX}
    assert float(update.upload["weight" + WEIGHT_SUFFIX]) == 10.0
    trained = slots.snapshot(["weight"])["weight"]
    torch.testing.assert_close(update.upload["weight"], 10.0 * (trained - state["weight"]))


def test_server_adam_matches_torch_adam_on_the_pseudo_gradient():
    theta = torch.randn(5)
    deltas = [torch.randn(5) for _ in range(3)]
    server = ServerOptimizer("adam", lr=0.01)
    state = {"p": theta.clone()}
    param = nn.Parameter(theta.clone())
    reference = torch.optim.Adam([param], lr=0.01, eps=1e-8)
    for d in deltas:
        state = server.step(state, {"p": d})
        param.grad = -d
        reference.step()
    torch.testing.assert_close(state["p"], param.detach())
