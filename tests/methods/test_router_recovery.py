"""Cluster recovery: the adjusted Rand index, the engine's router columns, and floral-em."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import adjusted_rand_score

from floral.data import ClientData, build_task
from floral.errors import ConfigError
from floral.experiment import build_engine, resolve_config
from floral.methods import base as base_module
from floral.methods import floral_em, get_method
from floral.methods.base import ServerState
from floral.methods.floral_em import adaptor_share, holdout_split, pick_adaptor, reseed
from floral.methods.routing import ROUTER_PREFIX
from floral.run import run_experiment
from floral.train.recovery import adjusted_rand_index, router_recovery


# -- the index itself -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("truth", "predicted", "expected"),
    [
        ([0, 0, 1, 1], [0, 0, 1, 1], 1.0),
        ([0, 0, 1, 1], [1, 1, 0, 0], 1.0),  # adaptors are unlabelled: a relabelling is perfect
        ([0, 0, 1, 1], [0, 0, 0, 0], 0.0),  # everyone on one adaptor says nothing
        ([0, 0, 1, 1], [0, 1, 0, 1], -0.5),  # every pair split the wrong way
        ([0, 1, 2, 3], [0, 0, 0, 0], 0.0),
        ([0, 0, 0, 0], [0, 0, 0, 0], 1.0),  # the same trivial partition
        ([0, 1, 2], [2, 0, 1], 1.0),  # all singletons on both sides
    ],
)
def test_ari_hand_cases(truth, predicted, expected):
    assert adjusted_rand_index(np.array(truth), np.array(predicted)) == pytest.approx(expected)


def test_ari_worked_example():
    # truth {a,b,c | d,e,f}, predicted {a,b | c,d | e,f}: contingency [[2,1,0],[0,1,2]].
    # index = 1 + 1 = 2; rows 3+3 = 6; columns 1+1+1 = 3; expected = 6*3/15 = 1.2;
    # max = (6+3)/2 = 4.5; ARI = (2-1.2)/(4.5-1.2) = 0.8/3.3.
    truth = [0, 0, 0, 1, 1, 1]
    predicted = [0, 0, 1, 1, 2, 2]
    assert adjusted_rand_index(truth, predicted) == pytest.approx(0.8 / 3.3)


def test_ari_matches_sklearn_on_random_labelings():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 60))
        truth = rng.integers(0, rng.integers(1, 7), n)
        predicted = rng.integers(0, rng.integers(1, 7), n)
        if rng.random() < 0.3:  # near-perfect recoveries too, not only chance-level ones
            predicted = (truth + 3) % 7
            predicted[rng.random(n) < 0.1] = 0
        assert adjusted_rand_index(truth, predicted) == pytest.approx(
            adjusted_rand_score(truth, predicted), abs=1e-12
        )


def test_ari_accepts_tensors_and_rejects_mismatched_lengths():
    assert adjusted_rand_index(torch.tensor([0, 1, 1]), torch.tensor([1, 0, 0])) == 1.0
    with pytest.raises(ValueError):
        adjusted_rand_index([0, 1], [0, 1, 1])


def test_router_recovery_uses_argmax_and_mean_max_weight():
    weights = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    scores = router_recovery(weights, torch.tensor([1, 1, 0, 0]))
    assert scores["router_ari"] == 1.0
    assert scores["router_confidence"] == pytest.approx((0.9 + 0.8 + 0.7 + 0.6) / 4)


# -- the engine's columns -------------------------------------------------------------------
TINY = {
    "name": "tiny-digits",
    "task": {"dataset": "digits", "shift": "label-shift", "num_clients": 8, "num_clusters": 2},
    "model": {"name": "mlp", "hidden": [16]},
    "train": {"rounds": 2, "clients_per_round": 0.5, "batch_size": 16, "router_lr": 1.0},
    "engine": {"eval_every": 1},
}


@pytest.mark.parametrize("method", ["floral", "ensemble", "floral-em"])
def test_learned_routers_report_recovery_every_evaluated_round(tmp_path, method):
    config = resolve_config({**TINY, "method": {"name": method}})
    summary = run_experiment(config, tmp_path)
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "router_ari" in header and "router_confidence" in header
    assert [row["round"] for row in summary.history] == [0, 1, 2]
    assert summary.history[0]["router_ari"] == 0.0  # all routers start alike: nothing found
    # The last row scores the routers the run saved: each client's leading adaptor, read from
    # state.safetensors, against its true cluster.
    state = load_file(tmp_path / "state.safetensors")
    clusters = [c.cluster for c in build_task(config.task, config.seed).clients]
    leading = []
    for k in range(len(clusters)):
        saved = [t for n, t in state.items() if n.startswith(f"private/{k}/{ROUTER_PREFIX}")]
        if not saved:  # never sampled: the uniform start, whose argmax is adaptor 0
            leading.append(0)
            continue
        (router,) = saved  # floral-em's fixed weights pi; the others' learned logits
        pi = router if method == "floral-em" else torch.softmax(router, dim=-1)
        leading.append(int(pi.reshape(-1, pi.shape[-1]).mean(dim=0).argmax()))
    expected = adjusted_rand_score(clusters, leading)
    assert summary.final["router_ari"] == pytest.approx(expected, abs=1e-12), leading


@pytest.mark.parametrize("method", ["fedavg", "local-adaptor", "floral-oracle", "ensemble-oracle"])
def test_methods_without_a_learned_router_report_none(tmp_path, method):
    summary = run_experiment(resolve_config({**TINY, "method": {"name": method}}), tmp_path)
    assert "router_ari" not in summary.final


def test_engine_ari_is_computed_from_the_private_routers():
    engine, task = build_engine(resolve_config({**TINY, "method": {"name": "floral"}}))
    # Hand every client a router that points at its cluster, except client 0.
    for k, client in enumerate(task.clients):
        logits = torch.zeros(2)
        logits[client.cluster if k else 1 - client.cluster] = 5.0
        engine.private[k] = {ROUTER_PREFIX + "logits": logits}
    clusters = [c.cluster for c in task.clients]
    predicted = [c if k else 1 - c for k, c in enumerate(clusters)]
    expected = adjusted_rand_score(clusters, predicted)
    assert engine.evaluate()["router_ari"] == pytest.approx(expected)


# -- floral-em's pieces ---------------------------------------------------------------------
def test_pick_adaptor_takes_the_lowest_loss_and_breaks_ties_at_random():
    assert pick_adaptor(torch.tensor([0.5, 0.2, 0.9]), seed=0) == 1
    tied = torch.tensor([0.3, 0.3, 0.3, 0.3])
    picks = {pick_adaptor(tied, seed) for seed in range(40)}
    assert picks == {0, 1, 2, 3}
    assert pick_adaptor(tied, 7) == pick_adaptor(tied, 7)  # repeatable from the seed


def test_pick_adaptor_counts_a_diverged_adaptor_as_worst():
    nan = float("nan")
    assert pick_adaptor(torch.tensor([nan, 0.7, 0.2]), seed=0) == 2
    everything_diverged = torch.tensor([nan, nan, nan])
    assert {pick_adaptor(everything_diverged, seed) for seed in range(40)} == {0, 1, 2}


def test_reseed_copies_the_most_used_adaptor_into_the_starving_one():
    model = {
        "layer.lora_A": torch.arange(12.0).reshape(3, 4),
        "layer.weight": torch.ones(3, 3),  # a base tensor that happens to have C rows
    }
    state = ServerState(model, {"usage": torch.tensor([0.7, 0.02, 0.28])})
    reseed(state, ["layer.lora_A"], target=1, source=0)
    assert torch.equal(model["layer.lora_A"][1], model["layer.lora_A"][0])
    assert torch.equal(model["layer.lora_A"][2], torch.arange(8.0, 12.0))
    assert torch.equal(model["layer.weight"], torch.ones(3, 3))
    assert torch.allclose(state.method_state["usage"], torch.tensor([0.35, 0.35, 0.28]))


def test_adaptor_share_sums_the_uploaded_weights():
    uploads = [
        {"a": torch.zeros(2, 1), "a::weight": torch.tensor([[10.0], [0.0]]),
         "w": torch.zeros(1), "w::weight": torch.tensor(10.0)},
        {"a": torch.zeros(2, 1), "a::weight": torch.tensor([[0.0], [30.0]]),
         "w": torch.zeros(1), "w::weight": torch.tensor(30.0)},
    ]
    names, share = adaptor_share(uploads)
    assert names == ["a"]
    assert torch.allclose(share, torch.tensor([0.25, 0.75]))


def test_floral_em_routes_each_client_one_hot_and_never_sees_the_cluster():
    method = get_method("floral-em")
    engine, task = build_engine(resolve_config({**TINY, "method": {"name": "floral-em"}}))
    engine.run()
    for k in engine.private:
        pi = method.router_weights(engine.private[k])
        assert sorted(pi.tolist()) == [0.0, 1.0]
    # The clusters never reach the method: its private state starts uniform for everyone.
    first = method.init_private(engine.worker.initial_private, task.clients[0])
    second = method.init_private(engine.worker.initial_private, task.clients[1])
    assert torch.equal(first[ROUTER_PREFIX + "fixed"], second[ROUTER_PREFIX + "fixed"])


def test_at_the_symmetric_start_the_paper_router_gets_no_gradient():
    # Why FLoRAL's learned router starts slowly: with B = 0 and zero adaptive biases every
    # adaptor outputs zero, so pi does not touch the loss until the adaptors have moved.
    engine, task = build_engine(resolve_config({**TINY, "method": {"name": "floral"}}))
    model = engine.model.train()
    data = task.clients[0]
    torch.nn.functional.cross_entropy(model(data.x_train), data.y_train).backward()
    assert torch.count_nonzero(model.floral_router.logits.grad) == 0
    factor_grads = [p.grad for n, p in model.named_parameters() if n.endswith("lora_B")]
    assert all(g is not None and g.abs().sum() > 0 for g in factor_grads)


def test_holdout_split_is_fixed_disjoint_and_covers_the_client():
    x = torch.arange(20.0)[:, None]
    data = ClientData(7, 0, x, torch.arange(20), x[:3], torch.arange(3))
    train, check = holdout_split(data, 0.2)
    assert (len(train.y_train), len(check.y_train)) == (16, 4)
    assert sorted(torch.cat([train.y_train, check.y_train]).tolist()) == list(range(20))
    again, check_again = holdout_split(data, 0.2)  # the same samples at every visit
    assert torch.equal(check.y_train, check_again.y_train)
    assert torch.equal(train.x_test, data.x_test)
    assert holdout_split(data, 0.0) == (data, data)
    one = ClientData(7, 0, x[:1], torch.arange(1), x[:1], torch.arange(1))
    assert holdout_split(one, 0.5) == (one, one)  # nothing left to train on otherwise
    _, tiny = holdout_split(data, 0.01)
    assert len(tiny.y_train) == 1  # at least one


def test_floral_em_assigns_on_held_out_samples_and_trains_on_the_rest(monkeypatch):
    seen: dict[str, list[torch.Tensor]] = {"assign": [], "train": []}
    real_losses, real_epochs = floral_em.adaptor_losses, base_module.train_epochs

    def record_losses(model, x, y, loss):
        seen["assign"].append(x)
        return real_losses(model, x, y, loss)

    def record_epochs(model, optimizer, x, y, *args, **kwargs):
        seen["train"].append(x)
        return real_epochs(model, optimizer, x, y, *args, **kwargs)

    monkeypatch.setattr(floral_em, "adaptor_losses", record_losses)
    monkeypatch.setattr(base_module, "train_epochs", record_epochs)
    config = resolve_config({**TINY, "method": {"name": "floral-em", "holdout": 0.25}})
    build_engine(config)[0].run()
    assert seen["assign"] and len(seen["assign"]) == len(seen["train"])
    for assigned, trained in zip(seen["assign"], seen["train"], strict=True):
        n = len(assigned) + len(trained)
        assert len(assigned) == max(1, round(0.25 * n))
        rows = {tuple(r.tolist()) for r in trained.flatten(1)}
        assert not any(tuple(r.tolist()) in rows for r in assigned.flatten(1))


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_floral_em_rejects_a_holdout_outside_zero_one(bad):
    with pytest.raises(ConfigError, match=f"method.holdout.*{bad}"):
        resolve_config({**TINY, "method": {"name": "floral-em", "holdout": bad}})


# -- floral-em's rank warm-up ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"warmup_rank": -2}, r"method.warmup_rank: must be 0 \(off\), at least 1 or a fraction"),
        ({"warmup_rank": 0.1, "warmup_rounds": 0},
         "method.warmup_rounds: must be at least 1, got 0"),
        ({"warmup_rank": 2, "rank": 3}, "method.rank = 3 is more than method.warmup_rank = 2"),
        ({"warmup_rank": 0.05, "rank": 0.1}, "method.rank = 0.1 is more than method.warmup_rank"),
        ({"warmup_rank": 0.1, "warmup_rounds": 2}, "method.warmup_rounds: 2 must end before the "
                                                   r"last round \(train.rounds = 2\)"),
        ({"warmup_rounds": 1}, r"method.warmup_rounds: 1 takes effect only with a rank warm-up"),
    ],
)
def test_floral_em_rejects_bad_warmup_settings_before_any_work(options, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config({**TINY, "method": {"name": "floral-em", "warmup_rounds": 1, **options}})


def test_floral_em_warmup_restarts_afresh_and_keeps_the_assignments():
    settings = {**TINY, "train": {**TINY["train"], "rounds": 5, "clients_per_round": 1.0}}
    method = {"name": "floral-em", "rank": 1, "warmup_rank": 4, "warmup_rounds": 2}
    config = resolve_config({**settings, "method": method})
    engine, _ = build_engine(config)
    initial = {k: v.clone() for k, v in engine.global_state.items()}
    engine.run_round()
    engine.run_round()
    # The cut restores the initial model at rank 1: A's first row as initialized, the rest 0.
    assert initial.keys() == engine.global_state.keys()
    for name, tensor in engine.global_state.items():
        expected = initial[name].clone()
        if name.endswith("lora_A"):
            expected[:, 1:] = 0.0
        assert torch.equal(tensor, expected), name
    assert int(engine.state.method_state["rounds"]) == 2
    assigned = {k: p[ROUTER_PREFIX + "fixed"].clone() for k, p in engine.private.items()}
    assert all(sorted(pi.tolist()) == [0.0, 1.0] for pi in assigned.values())
    for _ in range(3):
        engine.run_round()
    for k, pi in assigned.items():  # no E-step after the warm-up: every client stays
        assert torch.equal(engine.private[k][ROUTER_PREFIX + "fixed"], pi)
    assert engine.global_state["fc1.lora_B"].abs().sum() > 0  # and the adaptors train again


WARMUP = {"name": "floral-em", "rank": 1, "warmup_rank": 4, "warmup_rounds": 2}


def _warmup_run(download: str):
    settings = {**TINY, "train": {**TINY["train"], "rounds": 5, "clients_per_round": 1.0},
                "comm": {"download": download}}
    engine, _ = build_engine(resolve_config({**settings, "method": WARMUP}))
    sent: list[set[str]] = []
    encode = engine.down.encode
    engine.down.encode = lambda tensors: sent.append(set(tensors)) or encode(tensors)
    assignments = []
    for _ in range(5):
        engine.run_round()
        fixed = {k: int(p[ROUTER_PREFIX + "fixed"].argmax()) for k, p in engine.private.items()}
        assignments.append(fixed)
    return engine, sent, assignments


@pytest.mark.parametrize("download", ["bf16", "topk:0.5"])
def test_floral_em_server_state_never_travels_so_lossy_downloads_keep_its_rounds(download):
    dense, dense_sent, dense_assigned = _warmup_run("dense")
    lossy, lossy_sent, lossy_assigned = _warmup_run(download)
    model_globals = set(dense.global_state)
    assert all(names == model_globals for names in dense_sent + lossy_sent)  # nothing else
    assert int(lossy.state.method_state["rounds"]) == int(dense.state.method_state["rounds"]) == 5
    # After the warm-up (2 rounds) every client keeps its adaptor, whatever the codec did to
    # the tensors (a lost round count would restart the E-steps).
    for assigned in (dense_assigned, lossy_assigned):
        assert assigned[1] == assigned[2] == assigned[3] == assigned[4]
    if download == "bf16":  # rounding this mild leaves the warm-up's clusters as they were
        assert lossy_assigned[-1] == dense_assigned[-1]


def test_floral_em_warmup_names_a_conv_layer_it_cannot_cut():
    task = {"dataset": "mnist5k", "shift": "rotate", "num_clients": 8, "num_clusters": 2}
    config = resolve_config({**TINY, "task": task, "model": {"name": "cnn"},
                             "method": {"name": "floral-em", "warmup_rank": 0.1,
                                        "warmup_rounds": 1}})
    with pytest.raises(ConfigError, match="warmup_rank: layer '.*' is a Conv2d"):
        build_engine(config)


def test_floral_em_resumed_mid_warmup_ends_as_an_uninterrupted_run(tmp_path):
    # The warm-up's initial tensors and round counter are server state in the checkpoint, so a
    # run stopped before the restart resumes and restarts from the same tensors.
    settings = {**TINY, "train": {**TINY["train"], "rounds": 4, "clients_per_round": 1.0},
                "engine": {"eval_every": 1, "checkpoint_every": 1},
                "method": {**WARMUP, "warmup_rounds": 3}}
    config = resolve_config(settings)

    def stop_after_round_1(result, latest):  # noqa: ANN001
        if result.round == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, tmp_path / "resumed", on_round=stop_after_round_1)
    resumed = run_experiment(config, tmp_path / "resumed", resume=True)
    fresh = run_experiment(config, tmp_path / "fresh")
    assert resumed.final == fresh.final
    a = load_file(tmp_path / "resumed" / "state.safetensors")
    b = load_file(tmp_path / "fresh" / "state.safetensors")
    assert a.keys() == b.keys() and "method/rounds" in a
    assert all(torch.equal(a[name], b[name]) for name in a)
