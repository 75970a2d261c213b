"""User-level differential privacy (DP-FedAvg): clipping and noise by hand, the accountant
against Opacus' own figure, and the settings' one-line errors."""

from __future__ import annotations

import math

import pytest
import torch

from floral.engines.aggregation import private_upload
from floral.errors import ConfigError
from floral.experiment import build_engine, resolve_config
from floral.methods.base import WEIGHT_SUFFIX, weighted_mean_delta
from floral.methods.floral import learned_weights
from floral.run import run_experiment
from floral.train.privacy import ORDERS, dp_epsilon


@pytest.mark.parametrize(("q", "noise", "rounds"), [(0.1, 1.1, 100), (0.5, 0.8, 30),
                                                    (0.05, 2.0, 1000), (1.0, 3.0, 10)])
def test_epsilon_is_opacus_own_figure(q, noise, rounds):
    accountants = pytest.importorskip("opacus.accountants")
    accountant = accountants.RDPAccountant()
    accountant.history = [(noise, q, rounds)]
    theirs = accountant.get_epsilon(1e-5, alphas=list(ORDERS))
    assert dp_epsilon(q, noise, rounds, 1e-5) == pytest.approx(theirs, rel=1e-9)


def test_more_noise_spends_less_and_no_noise_is_no_privacy():
    spent = [dp_epsilon(0.2, z, 50, 1e-5) for z in (0.5, 1.0, 2.0)]
    assert spent[0] > spent[1] > spent[2] > 0
    assert dp_epsilon(0.2, 0.0, 50, 1e-5) == math.inf


def test_clipping_and_noise_by_hand():
    g = torch.Generator().manual_seed(0)
    deltas = [{"a": torch.randn(3, generator=g), "b": torch.randn(2, 2, generator=g)}
              for _ in range(3)]
    deltas[0] = {k: 100 * v for k, v in deltas[0].items()}  # far above the bound: clipped
    weights = [4.0, 1.0, 7.0]
    uploads = [{**{k: w * v for k, v in d.items()},
                **{k + WEIGHT_SUFFIX: torch.tensor(w) for k in d}} for d, w in zip(deltas, weights)]
    clip, noise = 1.5, 0.3
    private = private_upload(uploads, clip, noise, torch.Generator().manual_seed(9))
    mean = weighted_mean_delta([private])
    draws = torch.Generator().manual_seed(9)
    expected = {}
    norms = [math.sqrt(sum(float(v.square().sum()) for v in d.values())) for d in deltas]
    for name in ("a", "b"):
        clipped = sum(d[name] * min(1.0, clip / n) for d, n in zip(deltas, norms))
        noisy = clipped + noise * clip * torch.randn(deltas[0][name].shape, generator=draws)
        expected[name] = noisy / 3  # unweighted: every client counts once
    for name in ("a", "b"):
        torch.testing.assert_close(mean[name], expected[name])
    assert norms[0] > clip > 0


@pytest.mark.parametrize(
    ("train", "method", "words"),
    [
        ({"dp_noise": 1.0}, "fedavg", "train.dp_noise: needs train.dp_clip > 0"),
        ({"dp_clip": 1.0, "dp_delta": 0.0}, "fedavg", "train.dp_delta: must be in (0, 1)"),
        ({"dp_clip": 1.0, "aggregation": "median"}, "fedavg", "does not combine"),
        ({"dp_clip": 1.0}, "ensemble", "ensemble combines its uploads otherwise"),
        ({"dp_clip": 1.0}, "flora", "flora combines its uploads otherwise"),
    ],
)
def test_bad_privacy_settings_are_one_line_errors(train, method, words):
    with pytest.raises(ConfigError) as error:
        resolve_config({"method": {"name": method}, "train": train})
    assert words in str(error.value) and "\n" not in str(error.value)


def _private_config(num_clients: int, rounds: int, method: str = "fedavg",
                    **train: object):  # noqa: ANN202
    """`method` on a small synthetic task (two clusters for FLoRAL), evaluated every 2 rounds,
    with `train` settings."""
    return resolve_config({
        "name": "dp", "seed": num_clients,
        "task": {"dataset": "synthetic-mlp", "shift": "none", "num_clients": num_clients,
                 "num_clusters": 1 if method == "fedavg" else 2, "samples_per_client": 30},
        "model": {"name": "mlp", "hidden": [8]},
        "method": {"name": method},
        "train": {"rounds": rounds, "clients_per_round": 0.5, "batch_size": 8, **train},
        "engine": {"eval_every": 2},
    })


def test_a_private_run_reports_the_epsilon_it_spent(tmp_path):
    config = _private_config(10, 4, lr=0.05, dp_clip=0.5, dp_noise=1.0)
    summary = run_experiment(config, tmp_path)
    assert [round(r["dp_epsilon"], 9) for r in summary.history] == [
        round(dp_epsilon(0.5, 1.0, r, 1e-5), 9) for r in (0, 2, 4)]
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert "dp_epsilon" in header


def _local_run(noise: float):  # noqa: ANN202
    config = _private_config(6, 3, lr=0.5, dp_clip=0.05, dp_noise=noise, dp_mode="local")
    engine, _ = build_engine(config)
    seen: list[dict] = []
    real = engine.method.server_update

    def recording(state, uploads, optimizer):  # noqa: ANN001, ANN202
        seen.extend(dict(u) for u in uploads)
        return real(state, uploads, optimizer)

    engine.method.server_update = recording  # type: ignore[method-assign]
    engine.run()
    return engine, seen


def test_local_privacy_clips_and_weighs_every_update_on_its_client():
    engine, seen = _local_run(noise=0.0)
    assert len(seen) == 9  # 3 clients x 3 rounds, each its own noised upload
    for upload in seen:
        deltas = [v for k, v in upload.items() if not k.endswith(WEIGHT_SUFFIX)]
        norm = math.sqrt(sum(float(d.square().sum()) for d in deltas))
        assert norm <= 0.05 * (1 + 1e-5)  # lr 0.5 moves far more: every update was clipped
        assert all(float(v) == 1.0 for k, v in upload.items() if k.endswith(WEIGHT_SUFFIX))
    noisy, _ = _local_run(noise=1.0)
    assert engine.evaluate()["dp_epsilon"] == math.inf  # no noise, no privacy
    assert noisy.evaluate()["dp_epsilon"] == pytest.approx(dp_epsilon(1.0, 1.0, 3, 1e-5))


# -- FLoRAL: a weight per adaptor -----------------------------------------------------------


def _floral_uploads(pis: list[list[float]], ns: list[float]):  # noqa: ANN202
    """Hand-made FLoRAL uploads: a base tensor weighted by n, an adaptor factor (C, 2, 3) and
    an adaptor bias (C, 2) weighted by n * pi per adaptor; and the clients' plain deltas."""
    g = torch.Generator().manual_seed(1)
    deltas, uploads = [], []
    for pi, n in zip(pis, ns):
        delta = {"base": torch.randn(4, generator=g), "lora_A": torch.randn(2, 2, 3, generator=g),
                 "lora_b": torch.randn(2, 2, generator=g)}
        weight = n * torch.tensor(pi)
        weights = {"base": torch.tensor(n), "lora_A": weight.reshape(2, 1, 1),
                   "lora_b": weight.reshape(2, 1)}
        uploads.append({**{k: weights[k] * v for k, v in delta.items()},
                        **{k + WEIGHT_SUFFIX: w for k, w in weights.items()}})
        deltas.append(delta)
    return deltas, uploads


def test_floral_clipping_weighs_adaptors_by_pi_and_divides_by_the_public_count():
    pis, ns = [[0.9, 0.1], [0.5, 0.5], [0.0, 1.0]], [10.0, 3.0, 50.0]
    deltas, uploads = _floral_uploads(pis, ns)
    deltas[2] = {k: 30 * v for k, v in deltas[2].items()}  # far above the bound: clipped
    uploads[2] = {k: 30 * v if not k.endswith(WEIGHT_SUFFIX) else v
                  for k, v in uploads[2].items()}
    clip, noise, count = 6.0, 0.7, 4.0  # 4 sampled, 3 replied
    private = private_upload(uploads, clip, noise, torch.Generator().manual_seed(5), count=count)

    # By hand: the vector (base delta, pi_c x adaptor c's delta) of each client, clipped whole;
    # every client counts once, whatever its n.
    scaled = [{"base": d["base"], "lora_A": d["lora_A"] * torch.tensor(pi)[:, None, None],
               "lora_b": d["lora_b"] * torch.tensor(pi)[:, None]} for d, pi in zip(deltas, pis)]
    norms = [math.sqrt(sum(float(v.square().sum()) for v in s.values())) for s in scaled]
    assert norms[2] > clip > max(norms[:2])
    draws = torch.Generator().manual_seed(5)
    noisy = {}
    for name in ("base", "lora_A", "lora_b"):
        clipped = sum(s[name] * min(1.0, clip / n) for s, n in zip(scaled, norms))
        noisy[name] = clipped + noise * clip * torch.randn(clipped.shape, generator=draws)
    # The public count on every tensor and adaptor; no client's n or pi.
    assert float(private["base" + WEIGHT_SUFFIX]) == 4.0
    torch.testing.assert_close(private["lora_A" + WEIGHT_SUFFIX], torch.full((2, 1, 1), 4.0))
    torch.testing.assert_close(private["lora_b" + WEIGHT_SUFFIX], torch.full((2, 1), 4.0))
    mean = weighted_mean_delta([private])
    for name in ("base", "lora_A", "lora_b"):
        torch.testing.assert_close(mean[name], noisy[name] / 4)


def test_noise_has_the_standard_deviation_of_multiplier_times_clip():
    """No updates at all: what comes out is the noise alone, n(0, (z C)^2) per coordinate
    of the sum, whatever the weights."""
    size = 200_000
    zero = {"base": torch.zeros(size), "base" + WEIGHT_SUFFIX: torch.tensor(7.0),
            "lora": torch.zeros(2, size), "lora" + WEIGHT_SUFFIX: torch.tensor([[3.0], [4.0]])}
    private = private_upload([zero, zero], 0.25, 1.5, torch.Generator().manual_seed(0))
    for name in ("base", "lora"):
        assert float(private[name].std()) == pytest.approx(1.5 * 0.25, rel=0.01)
        assert abs(float(private[name].mean())) < 0.01


def _floral_step(**train: object):  # noqa: ANN202
    """Client 1's first step in FLoRAL (synthetic MLP, 2 adaptors), and the method's C."""
    config = _private_config(6, 1, "floral", lr=0.5, router_lr=5.0, **train)
    engine, _ = build_engine(config)
    # Through the client worker, where local privacy is applied before an upload leaves.
    update = engine.worker.train(1, engine.global_state, {1: engine.local.private_state(1)})[1]
    return update, engine.method.options


def test_local_privacy_clips_floral_updates_with_the_router_as_factors():
    plain, options = _floral_step()
    private, _ = _floral_step(dp_clip=0.05, dp_noise=0.0, dp_mode="local")
    pi = learned_weights(plain.private, options.temperature)
    assert pi is not None and float(pi.max()) < 0.99  # a real mixture, not one-hot
    names = [k for k in plain.upload if not k.endswith(WEIGHT_SUFFIX)]
    adaptors = [k for k in names if plain.upload[k + WEIGHT_SUFFIX].numel() > 1]
    assert adaptors and len(adaptors) < len(names)
    n = float(plain.num_examples)
    # By hand, from the non-private upload (w * delta, w): the delta times pi per adaptor.
    scaled = {}
    for name in names:
        weight = plain.upload[name + WEIGHT_SUFFIX]
        delta = plain.upload[name] / weight
        if name in adaptors:
            torch.testing.assert_close(weight.flatten(), n * pi)
            delta = delta * pi.reshape(weight.shape)
        scaled[name] = delta
    norm = math.sqrt(sum(float(v.square().sum()) for v in scaled.values()))
    assert norm > 0.05  # lr 0.5 moves far more than the bound
    for name in names:
        torch.testing.assert_close(private.upload[name], scaled[name] * 0.05 / norm)
        weight = private.upload[name + WEIGHT_SUFFIX]
        assert torch.equal(weight, torch.ones_like(weight)), name  # nothing private


def test_a_private_floral_run_reports_epsilon_and_hides_the_weights(tmp_path):
    config = _private_config(8, 4, "floral", lr=0.05, dp_clip=0.5, dp_noise=1.0)
    engine, _ = build_engine(config)
    seen: list[dict] = []
    real = engine.method.server_update

    def recording(state, uploads, optimizer):  # noqa: ANN001, ANN202
        seen.append({k: v for u in uploads for k, v in u.items() if k.endswith(WEIGHT_SUFFIX)})
        assert len(uploads) == 1  # the server's one noised sum
        return real(state, uploads, optimizer)

    def one_lost(round_, clients, payload):  # noqa: ANN001, ANN202
        replies = dict(real_train(round_, clients, payload))
        replies[min(replies)] = "lost on the way"
        return replies

    engine.method.server_update = recording  # type: ignore[method-assign]
    real_train = engine.transport.train
    engine.transport.train = one_lost  # type: ignore[method-assign]
    engine.run()
    assert len(seen) == 4
    # 4 clients sampled, 3 replied: every weight is the public 4, not the weights (n, n * pi)
    # of the clients that replied.
    for weights in seen:
        assert any(w.numel() > 1 for w in weights.values())  # the adaptors' shape is kept
        assert all(bool((w == 4.0).all()) for w in weights.values())
    assert engine.evaluate()["dp_epsilon"] == pytest.approx(dp_epsilon(0.5, 1.0, 4, 1e-5))
    summary = run_experiment(config, tmp_path)
    assert [round(r["dp_epsilon"], 9) for r in summary.history] == [
        round(dp_epsilon(0.5, 1.0, r, 1e-5), 9) for r in (0, 2, 4)]


@pytest.mark.parametrize("mode", ["central", "local"])
def test_private_floral_ends_alike_on_flower(tmp_path, mode):
    # Noise and a DP run's sampling come from OS entropy, so only clipping can be compared
    # across engines: without noise, every client sampled.
    pytest.importorskip("flwr")
    from support.flower import run_loopback, tiny_experiment

    config = resolve_config(tiny_experiment("floral"), [
        "train.dp_clip=0.5", "train.dp_noise=0.0", f"train.dp_mode={mode}",
        "train.clients_per_round=1.0"])
    local = run_experiment(config, tmp_path / "local")
    flower, _ = run_loopback(config, tmp_path / "flower")
    assert flower.final == local.final
    assert "dp_epsilon" in local.final
