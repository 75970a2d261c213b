"""Robust aggregation (`train.aggregation = "median"` or "trimmed:<fraction>"): the statistic
against numpy and scipy, its declared reach, and a run that shrugs off sign-flipping clients."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from scipy.stats import trim_mean
from support import ROOT

from floral.engines.aggregation import aggregation_for, robust_upload
from floral.errors import ConfigError
from floral.experiment import resolve_config
from floral.methods import get_method
from floral.methods.base import WEIGHT_SUFFIX, weighted_mean_delta
from floral.train import TrainConfig

sys.path.insert(0, str(ROOT))
from scripts import robust_aggregation  # noqa: E402


def _uploads(k: int, seed: int) -> tuple[list[dict], np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    deltas = torch.randn(k, 3, 4, generator=g)
    weights = torch.randint(1, 50, (k,), generator=g).float()
    weights[0] = 0.0  # a client without examples takes no part
    uploads = [{"t": w * d, "t" + WEIGHT_SUFFIX: w} for d, w in zip(deltas, weights)]
    return uploads, deltas[1:].numpy(), weights[1:].numpy()


@pytest.mark.parametrize("k", [6, 7])  # an odd and an even number of live clients
def test_the_median_and_trimmed_mean_are_numpy_s_and_scipy_s(k):
    uploads, deltas, _ = _uploads(k, seed=k)
    median = weighted_mean_delta([robust_upload(uploads, "median")])["t"]
    np.testing.assert_allclose(median.numpy(), np.median(deltas, axis=0), rtol=1e-6)
    trimmed = weighted_mean_delta([robust_upload(uploads, "trimmed:0.2")])["t"]
    np.testing.assert_allclose(trimmed.numpy(), trim_mean(deltas, 0.2, axis=0), rtol=1e-5)


def test_one_weight_per_part_is_refused():
    uploads = [{"t": torch.ones(2, 3), "t" + WEIGHT_SUFFIX: torch.ones(2, 1)}] * 3
    with pytest.raises(ValueError, match="one weight per tensor"):
        robust_upload(uploads, "median")


@pytest.mark.parametrize(
    ("rule", "method", "words"),
    [
        ("mode", "fedavg", "unknown 'mode'"),
        ("trimmed:0.5", "fedavg", "a fraction in [0, 0.5)"),
        ("trimmed:x", "fedavg", "a fraction in [0, 0.5)"),
        ("median", "floral", "floral combines its uploads otherwise"),
        ("median", "flora", "flora combines its uploads otherwise"),
    ],
)
def test_bad_rules_are_one_line_errors_naming_the_key(rule, method, words):
    with pytest.raises(ConfigError) as error:
        aggregation_for(TrainConfig(aggregation=rule), get_method(method), num_clients=10)
    message = str(error.value)
    assert message.startswith("train.aggregation:") and words in message and "\n" not in message
    with pytest.raises(ConfigError, match="train.aggregation"):
        resolve_config({"method": {"name": method}, "train": {"aggregation": rule}})


def test_the_median_shrugs_off_clients_that_flip_their_updates():
    clean = robust_aggregation.accuracy("mean", 0.0, 1.0, seed=0, rounds=8)
    attacked_mean = robust_aggregation.accuracy("mean", 0.2, 1.0, seed=0, rounds=8)
    attacked_median = robust_aggregation.accuracy("median", 0.2, 1.0, seed=0, rounds=8)
    assert attacked_mean < 20 < clean - 50  # two bad clients of ten ruin the mean ...
    assert attacked_median > clean - 3  # ... and barely move the median
