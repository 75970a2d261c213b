"""User-level differential privacy (DP-FedAvg): clipping and noise by hand, the accountant
against Opacus' own figure, and the settings' one-line errors."""

from __future__ import annotations

import math

import pytest
import torch

from floral.errors import ConfigError
from floral.experiment import build_engine, resolve_config
from floral.methods.base import WEIGHT_SUFFIX, private_upload, weighted_mean_delta
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
        ({"dp_clip": 1.0}, "floral", "floral combines its uploads otherwise"),
    ],
)
def test_bad_privacy_settings_are_one_line_errors(train, method, words):
    with pytest.raises(ConfigError) as error:
        resolve_config({"method": {"name": method}, "train": train})
    assert words in str(error.value) and "\n" not in str(error.value)


def _private_config(num_clients: int, rounds: int, **train: object):  # noqa: ANN202
    """FedAvg on a small synthetic task, evaluated every 2 rounds, with `train` settings."""
    return resolve_config({
        "name": "dp", "seed": num_clients,
        "task": {"dataset": "synthetic-mlp", "shift": "none", "num_clients": num_clients,
                 "num_clusters": 1, "samples_per_client": 30},
        "model": {"name": "mlp", "hidden": [8]},
        "method": {"name": "fedavg"},
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
