"""The federated-LoRA methods: aggregation against hand computations, roles, ranks, runs."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from support.results import assert_final_accuracy_is_the_saved_states, assert_trained
from support.steps import client_step, server_update
from torch import nn

from floral.adapters.layers import AdaptedConv2d
from floral.data import ClientData, FederatedTask
from floral.errors import ConfigError
from floral.experiment import resolve_config
from floral.methods import WEIGHT_SUFFIX, Role, get_method
from floral.methods.base import split_roles
from floral.methods.flora import factor_product
from floral.methods.hetlora import zero_padded
from floral.methods.lora_common import UploadShapeError, client_ranks, first_ranks, truncated
from floral.models import ModelConfig, build_model
from floral.run import run_experiment
from floral.train import StateSlots, TrainConfig
from floral.train.optim import ServerOptimizer

PLAIN_SGD = ServerOptimizer("sgd", lr=1.0)


def _client(k: int, n: int = 12) -> ClientData:
    g = torch.Generator().manual_seed(k)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    return ClientData(k, k % 2, x, y, x[:4], y[:4])


def _built(name: str, options: dict | None = None, clients: int = 3):
    torch.manual_seed(0)
    task = FederatedTask("toy", "classification", (6,), 3, 2, [_client(k) for k in range(clients)])
    method = get_method(name, options or {})
    model = method.build_model(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), task)
    return method, model, task


def _train_clients(method, model, task, ranks=None):
    """Client steps from one global state; returns (global state, uploads, trained params)."""
    slots = StateSlots(model)
    global_names, _ = split_roles(method.roles(model))
    global_state = slots.snapshot(global_names)
    config = TrainConfig(batch_size=4, lr=0.2)
    uploads, trained = [], []
    for client in task.clients:
        update = client_step(
            method, slots, global_state, {}, client, config, "classification", seed=client.client_id
        )
        uploads.append(update.upload)
        trained.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return global_state, uploads, trained


# -- FLoRA: exact stacking ----------------------------------------------------------------------
def test_flora_stacking_equals_dense_weighted_sum_of_products():
    method, model, _ = _built("flora", {"rank_tiers": [2, 3, 5], "alpha": 0.7})
    state = {n: t.detach().clone() for n, t in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    ranks, counts = [2, 3, 5], [10.0, 30.0, 60.0]
    uploads = []
    for r, n in zip(ranks, counts):
        upload = {}
        for layer, (d_in, d_out) in {"0": (6, 5), "2": (5, 3)}.items():
            upload[f"{layer}.lora_A"] = torch.randn(1, r, d_in, generator=g)
            upload[f"{layer}.lora_B"] = torch.randn(1, r, d_out, generator=g)
            upload[f"{layer}.lora_bias"] = torch.randn(1, d_out, generator=g)
            upload[f"{layer}.lora_A" + WEIGHT_SUFFIX] = torch.tensor(n)
            upload[f"{layer}.lora_bias" + WEIGHT_SUFFIX] = torch.tensor(n)
        uploads.append(upload)
    global_state = {n: state[n] for n in split_roles(method.roles(model))[0]}
    new = server_update(method, global_state, uploads, PLAIN_SGD, model)
    p = torch.tensor(counts) / sum(counts)
    for layer in ("0", "2"):
        dense = sum(
            p[k] * uploads[k][f"{layer}.lora_B"][0].T @ uploads[k][f"{layer}.lora_A"][0]
            for k in range(3)
        )
        bias = sum(p[k] * uploads[k][f"{layer}.lora_bias"][0] for k in range(3))
        want = state[f"{layer}.base.weight"] + 0.7 * dense
        torch.testing.assert_close(new[f"{layer}.base.weight"], want, atol=1e-6, rtol=1e-6)
        want_bias = state[f"{layer}.base.bias"] + 0.7 * bias
        torch.testing.assert_close(new[f"{layer}.base.bias"], want_bias, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("form", ["separable", "kxk-1x1"])
def test_factor_product_matches_the_adapted_conv_fold(form):
    torch.manual_seed(0)
    layer = AdaptedConv2d(nn.Conv2d(3, 4, (3, 2)), 1, rank=5, alpha=1.0, form=form)
    with torch.no_grad():
        layer.lora_B.normal_()
        before = layer.base.weight.clone()
        folded = layer.fold(torch.ones(1)).weight - before
    product = factor_product(layer.lora_A[0], layer.lora_B[0], before.shape)
    torch.testing.assert_close(product, folded, atol=1e-5, rtol=1e-5)


def test_flora_clients_send_their_own_rank_and_leave_a_clean_base():
    method, model, task = _built("flora", {"ranks": [1, 2, 4]})
    _, uploads, _ = _train_clients(method, model, task)
    assert [u["0.lora_A"].shape[1] for u in uploads] == [1, 2, 4]
    assert all(torch.count_nonzero(u["0.lora_B"]) > 0 for u in uploads)
    assert torch.count_nonzero(model.get_parameter("0.lora_B")) == 0  # evaluated model = base
    roles = method.roles(model)
    assert roles["0.base.weight"] is Role.GLOBAL and roles["0.lora_A"] is Role.FROZEN


# -- FFA-LoRA: A frozen, exact mean ------------------------------------------------------------
def test_ffa_lora_aggregate_is_the_mean_of_the_products():
    method, model, task = _built("ffa-lora")
    global_state, uploads, trained = _train_clients(method, model, task)
    assert not any(name.endswith("lora_A") for name in global_state)
    assert all(torch.equal(t["0.lora_A"], trained[0]["0.lora_A"]) for t in trained)
    new = server_update(method, global_state, uploads, PLAIN_SGD, model)
    a = model.get_parameter("0.lora_A")[0].detach()
    p = torch.tensor([c.num_train for c in task.clients], dtype=torch.float32)
    p /= p.sum()
    mean_of_products = sum(p[k] * trained[k]["0.lora_B"][0].T @ a for k in range(3))
    torch.testing.assert_close(new["0.lora_B"][0].T @ a, mean_of_products, atol=1e-6, rtol=1e-5)


def test_fedit_mean_of_factors_is_not_the_mean_of_products():
    # The contrast that motivates FFA-LoRA and FLoRA: FedIT averages A and B separately.
    method, model, task = _built("fedit")
    global_state, uploads, trained = _train_clients(method, model, task)
    new = server_update(method, global_state, uploads, PLAIN_SGD, model)
    mean_of_products = sum(t["0.lora_B"][0].T @ t["0.lora_A"][0] for t in trained) / 3
    product_of_means = new["0.lora_B"][0].T @ new["0.lora_A"][0]
    assert not torch.allclose(product_of_means, mean_of_products, atol=1e-6)


def test_fedsa_lora_keeps_b_private():
    method, model, task = _built("fedsa-lora")
    roles = method.roles(model)
    assert roles["0.lora_A"] is Role.GLOBAL and roles["0.lora_B"] is Role.PRIVATE
    assert roles["0.base.weight"] is Role.FROZEN
    _, uploads, _ = _train_clients(method, model, task)
    assert "0.lora_A" in uploads[0] and not any("lora_B" in k for k in uploads[0])


def test_flocora_trains_factors_and_head_on_a_frozen_base():
    method, model, _ = _built("flocora")
    roles = method.roles(model)
    assert roles["0.base.weight"] is Role.FROZEN and roles["0.lora_A"] is Role.GLOBAL
    assert roles["2.weight"] is Role.GLOBAL  # the head, trained in full without an adaptor
    assert not model.get_parameter("0.base.weight").requires_grad
    assert model.get_parameter("2.weight").requires_grad


# -- HetLoRA: truncation and zero padding -------------------------------------------------------
def test_truncation_and_zero_padding_round_trip():
    factor = torch.randn(1, 6, 4)
    kept = first_ranks({"x.lora_A": factor}, 3)["x.lora_A"]
    assert torch.equal(kept, factor[:, :3])
    padded = zero_padded(
        {"x.lora_A": kept, "x.lora_A" + WEIGHT_SUFFIX: torch.tensor(1.0)},
        {"x.lora_A": torch.zeros(1, 6, 4)},
        per_rank=False,
    )["x.lora_A"]
    assert torch.equal(first_ranks({"x.lora_A": padded}, 3)["x.lora_A"], kept)
    assert torch.equal(padded, truncated({"x.lora_A": factor}, 3)["x.lora_A"])


@pytest.mark.parametrize("aggregation", ["zero-padded", "per-rank"])
def test_hetlora_aggregation_by_hand(aggregation):
    method, model, task = _built("hetlora", {"ranks": [2, 5, 8], "aggregation": aggregation})
    global_state, uploads, trained = _train_clients(method, model, task)
    assert [u["0.lora_B"].shape[1] for u in uploads] == [2, 5, 8]
    # A client's ranks beyond its own stay zero while it trains.
    assert torch.count_nonzero(trained[0]["0.lora_A"][:, 2:]) == 0
    new = server_update(method, global_state, uploads, PLAIN_SGD, model)
    n = torch.tensor([c.num_train for c in task.clients], dtype=torch.float32)
    for name in ("0.lora_A", "0.lora_B"):
        padded = torch.stack([t[name] for t in trained])  # zeros beyond r_k already
        holds = torch.zeros(3, 1, 8, 1)
        for k, r in enumerate([2, 5, 8]):
            holds[k, :, :r] = 1.0
        if aggregation == "zero-padded":
            want = (n.view(3, 1, 1, 1) * padded).sum(0) / n.sum()
        else:
            w = n.view(3, 1, 1, 1) * holds
            want = (w * padded).sum(0) / w.sum(0)
        torch.testing.assert_close(new[name], want, atol=1e-6, rtol=1e-5)


def test_upload_of_the_wrong_shape_says_which_upload_sent_what():
    method, model, task = _built("hetlora", {"ranks": [2, 5, 8]})
    global_state, uploads, _ = _train_clients(method, model, task)
    uploads[1]["0.lora_A"] = torch.zeros(1, 9, 6)
    with pytest.raises(UploadShapeError) as error:
        server_update(method, global_state, uploads, PLAIN_SGD, model)
    message = str(error.value)
    assert "upload 2 of 3" in message and "(1, 9, 6)" in message and "r <= 8" in message


def test_rank_tiers_are_contiguous_blocks_of_client_ids():
    options = get_method("hetlora", {"rank_tiers": [2, 4, 8]}).options
    assert client_ranks(options, 6) == [2, 2, 4, 4, 8, 8]
    with pytest.raises(ConfigError, match="method.ranks: 2 ranks for 3 clients"):
        _built("flora", {"ranks": [2, 4]})


# -- pretrained base ----------------------------------------------------------------------------
def test_init_from_loads_a_previous_runs_global_tensors(tmp_path):
    task = _built("fedit")[2]
    torch.manual_seed(5)
    source = build_model(ModelConfig(name="mlp", hidden=[7]), task)
    state = {f"global/{k}": v for k, v in source.state_dict().items()}
    save_file({**state, "engine/round": torch.tensor(3)}, tmp_path / "state.safetensors")
    loaded = build_model(ModelConfig("mlp", [7], str(tmp_path / "state.safetensors")), task)
    for name, tensor in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    with pytest.raises(ConfigError, match=r"^model.init_from: .*fc1.bias has shape \(7,\)"):
        build_model(ModelConfig("mlp", [9], str(tmp_path / "state.safetensors")), task)
    adapted = {"global/fc1.base.weight": torch.zeros(7, 6)}  # a run with adaptors attached
    save_file(adapted, tmp_path / "adapted.safetensors")
    with pytest.raises(ConfigError, match=r"^model.init_from: .* missing fc1.weight"):
        build_model(ModelConfig("mlp", [7], str(tmp_path / "adapted.safetensors")), task)
    with pytest.raises(ConfigError, match=r"^model.init_from: no such file"):
        build_model(ModelConfig("mlp", [7], str(tmp_path / "none.safetensors")), task)


# -- whole runs ---------------------------------------------------------------------------------
TINY = {
    "name": "tiny",
    "task": {"dataset": "digits", "shift": "rotate", "num_clients": 8, "num_clusters": 2},
    "model": {"name": "mlp", "hidden": [16]},
    "train": {"rounds": 2, "clients_per_round": 0.5, "batch_size": 16},
    "engine": {"eval_every": 2},
}


@pytest.mark.parametrize(
    "method, options, settings",
    [
        ("fedit", {}, []),
        ("ffa-lora", {}, []),
        ("fedsa-lora", {}, []),
        (
            "flasc",
            {},
            [
                "comm.download=topk:0.5",
                "comm.upload=topk:0.1",
                "train.server_optimizer=adam",
                "train.server_lr=0.01",
            ],
        ),
        ("flocora", {}, ["comm.download=quant:8", "comm.upload=quant:2"]),
        ("flora", {"rank_tiers": [2, 4]}, ["comm.upload=fp16"]),
        ("hetlora", {"rank_tiers": [2, 4]}, ["comm.upload=quant:4"]),
        ("floral", {}, ["comm.upload=topk:0.1"]),
        ("floral", {}, ["comm.upload=quant:8", "comm.download=bf16"]),
    ],
)
def test_method_runs_two_rounds_end_to_end(tmp_path, method, options, settings):
    config = resolve_config({**TINY, "method": {"name": method, **options}}, settings)
    summary = run_experiment(config, tmp_path)
    assert summary.rounds == 2
    assert_trained(summary)
    assert_final_accuracy_is_the_saved_states(config, summary)
    assert summary.bytes_up > 0 and summary.bytes_down > 0
