"""The privacy spent by DP-FedAvg: Rényi differential privacy of the subsampled Gaussian.

Each round samples a fraction q of the clients and adds Gaussian noise of multiplier z to the
sum of their clipped updates; the RDP of one round at an integer order a is (Mironov, Talwar
and Zhang, 2019, eq. 4, for integer orders)

    log( sum_{k=0..a} C(a, k) (1 - q)^(a - k) q^k exp(k (k - 1) / (2 z^2)) ) / (a - 1),

rounds add up, and (epsilon, delta)-DP follows with the conversion of Balle et al. (2020):
epsilon = min_a  R(a) + log((a - 1) / a) - (log delta + log a) / (a - 1). The sampling of a
fixed number of clients per round is treated as Poisson sampling of rate q, as is usual.
"""

from __future__ import annotations

import math
import secrets

import numpy as np
import torch

__all__ = ["ORDERS", "dp_epsilon", "rdp_subsampled_gaussian", "secret_generator", "secret_rng"]

ORDERS = tuple(range(2, 65))


def rdp_subsampled_gaussian(q: float, noise: float, order: int) -> float:
    """RDP of one round at integer `order` (sampling rate q, noise multiplier)."""
    if q == 0:
        return 0.0
    if q == 1:
        return order / (2 * noise**2)
    terms = [
        math.lgamma(order + 1) - math.lgamma(k + 1) - math.lgamma(order - k + 1)
        + (order - k) * math.log1p(-q) + k * math.log(q) + k * (k - 1) / (2 * noise**2)
        for k in range(order + 1)
    ]
    top = max(terms)
    return (top + math.log(sum(math.exp(t - top) for t in terms))) / (order - 1)


def dp_epsilon(q: float, noise: float, rounds: int, delta: float) -> float:
    """Epsilon after `rounds` rounds at `delta`; infinity without noise."""
    if noise <= 0:
        return math.inf
    if rounds == 0:
        return 0.0
    best = math.inf
    for order in ORDERS:
        rdp = rounds * rdp_subsampled_gaussian(q, noise, order)
        loss = (math.log(delta) + math.log(order)) / (order - 1)
        best = min(best, rdp + math.log((order - 1) / order) - loss)
    return max(best, 0.0)


# Randomness that protects someone comes from the operating system's entropy, never from the
# run's seed: the seed is in config.toml, and whoever replays noise drawn from it subtracts it
# (the update comes back exact), or knows who was sampled (the accountant's amplification by
# subsampling assumes nobody does). A DP run is therefore not repeatable, by design.
def secret_generator() -> torch.Generator:
    """A CPU generator seeded from OS entropy, for DP noise: nobody can replay its draws."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def secret_rng() -> np.random.Generator:
    """A NumPy generator seeded from OS entropy, for a DP run's choice of clients."""
    return np.random.default_rng(secrets.randbits(128))
