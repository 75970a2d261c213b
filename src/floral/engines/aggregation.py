"""Aggregation policies: how a round's checked uploads become what a method's server reads.

In the shape of Flower's strategy wrappers: a policy is an object, central differential privacy
wraps another policy, and the driver calls whichever it was given without knowing its name.

    Mean           the uploads as they are: the method's server takes their (weighted) mean
    Median         one upload standing for all: the coordinate-wise median of the deltas
    Trimmed(f)     ... the trimmed mean, a fraction f cut at each end, coordinate by coordinate
    SecureSum      the transport hands over only the sum (Flower's SecAgg+); the mean of it
    CentralDP(p)   every client's update clipped, summed, noised (DP-FedAvg) around policy p

Each policy declares what it needs of a method (`needs`: capabilities a method offers, any one
of them) and whether it reads each client's upload (`reads_each_upload`; a transport that
delivers only the sum cannot serve it). Methods declare what they offer, conservatively
(`Method.offers`). `aggregation_for` builds the policy from the settings and refuses, in one
line naming the setting, what cannot work, before any round.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from floral.config import check_choice
from floral.errors import ConfigError
from floral.methods.base import Capability, Method
from floral.train.loop import DpMode, TrainConfig
from floral.train.privacy import secret_generator
from floral.train.state import WEIGHT_SUFFIX, TensorDict

__all__ = [
    "Aggregation",
    "CentralDP",
    "Mean",
    "Median",
    "RoundInfo",
    "SecureSum",
    "Trimmed",
    "aggregation_for",
    "check_privacy",
    "parse_rule",
    "private_update",
    "private_upload",
    "robust_upload",
    "robustness_warning",
]


@dataclass(frozen=True)
class RoundInfo:
    """What a policy may know of the round: public values only."""

    round: int
    sampled: int  # clients sampled this round (depends on the settings alone)


@dataclass(frozen=True)
class Setting:
    """What the build-time check sees: the method, and what else limits the policy."""

    method: Method
    upload_codec: str
    clients_per_round: int  # clients sampled each round
    each_upload: bool  # whether the transport delivers each client's upload (no SecAgg+)


class Aggregation(ABC):
    """One way to combine a round's uploads; `combine` returns what `server_update` reads."""

    key: ClassVar[str] = "train.aggregation"  # the setting that chose the policy
    needs: ClassVar[frozenset[Capability]] = frozenset()  # any one of them; empty: any method
    reads_each_upload: ClassVar[bool] = True
    # What a refused method lacks, in words, after "needs uploads ...".
    why: ClassVar[str] = ""

    @abstractmethod
    def combine(self, uploads: Sequence[TensorDict], info: RoundInfo) -> list[TensorDict]: ...

    @abstractmethod
    def describe(self) -> str: ...

    def withstands(self, clients: int) -> int:
        """How many arbitrarily bad updates among `clients` aggregated this policy removes
        entirely (the mean: none)."""
        return 0

    def check(self, setting: Setting) -> None:
        """One-line errors for what this policy cannot do in `setting`."""
        method = setting.method
        if self.needs and not self.needs & method.offers():
            raise ConfigError(f"{self.key}: {self.describe()} needs uploads {self.why}; "
                              f"{method.name} combines its uploads otherwise")
        if self.reads_each_upload and not setting.each_upload:
            raise ConfigError(f"{self.key}: {self.describe()} needs each client's update, "
                              "which secure aggregation (flower.secagg) hides")


class Mean(Aggregation):
    """The uploads as they came: the method's own (weighted) mean."""

    def combine(self, uploads: Sequence[TensorDict], info: RoundInfo) -> list[TensorDict]:
        return list(uploads)

    def describe(self) -> str:
        return "'mean'"

    def check(self, setting: Setting) -> None:
        pass  # every method combines its own uploads; the transport may sum them first


class _Robust(Aggregation):
    needs = frozenset({Capability.MEAN_PER_TENSOR})
    why = "combined by a mean with one weight per tensor"

    def combine(self, uploads: Sequence[TensorDict], info: RoundInfo) -> list[TensorDict]:
        return [robust_upload(uploads, self.rule())] if uploads else []

    def describe(self) -> str:
        return repr(self.rule())

    @abstractmethod
    def rule(self) -> str: ...


class Median(_Robust):
    def rule(self) -> str:
        return "median"

    def withstands(self, clients: int) -> int:
        return (clients - 1) // 2  # the median stays among the good while they are most


@dataclass(frozen=True)
class Trimmed(_Robust):
    fraction: float  # cut at each end, in [0, 0.5)

    def rule(self) -> str:
        return f"trimmed:{self.fraction:g}"

    def withstands(self, clients: int) -> int:
        # Cut at each end, sized from the clients actually aggregated (`robust_upload`): bad
        # updates all on one side are removed up to the cut.
        return min(int(self.fraction * clients), (clients - 1) // 2)


class SecureSum(Aggregation):
    """Flower's SecAgg+: the server learns the sum of the uploads, never one of them."""

    key = "flower.secagg"
    needs = frozenset({Capability.SUM_ONLY})
    reads_each_upload = False

    def combine(self, uploads: Sequence[TensorDict], info: RoundInfo) -> list[TensorDict]:
        return list(uploads)  # the transport delivered the sum (and zeros of weight zero)

    def describe(self) -> str:
        return "secure aggregation"

    def check(self, setting: Setting) -> None:
        if not self.needs & setting.method.offers():
            raise ConfigError(f"{self.key}: {setting.method.name} reads each client's upload on "
                              "its own, which secure aggregation hides; it needs the sum only")
        if setting.upload_codec != "dense":
            raise ConfigError(f"{self.key}: comm.upload = {setting.upload_codec!r}: SecAgg+ "
                              "masks the dense upload with its own quantization; use "
                              "comm.upload = \"dense\"")
        if setting.clients_per_round < 2:
            raise ConfigError(f"{self.key}: a sum hides nothing with one client per round; "
                              "raise train.clients_per_round to at least 2 clients")


@dataclass(frozen=True)
class CentralDP(Aggregation):
    """DP-FedAvg on the server: each update clipped to `clip`, the sum noised with standard
    deviation `noise * clip` from OS entropy, divided by the public number of clients
    sampled. Wraps the mean: the accountant counts the Gaussian mechanism of one mean."""

    inner: Aggregation
    clip: float
    noise: float

    key = "train.dp_clip"
    needs = frozenset({Capability.MEAN_PER_TENSOR, Capability.MEAN_PER_PART})
    why = "combined by a mean with one weight per tensor or per adaptor"

    def combine(self, uploads: Sequence[TensorDict], info: RoundInfo) -> list[TensorDict]:
        inner = self.inner.combine(uploads, info)
        if not inner:
            return []
        return [private_upload(inner, self.clip, self.noise, secret_generator(),
                               count=float(info.sampled))]

    def describe(self) -> str:
        return "differential privacy"

    def withstands(self, clients: int) -> int:
        return self.inner.withstands(clients)

    def check(self, setting: Setting) -> None:
        if not setting.each_upload:
            raise ConfigError("flower.secagg: central differential privacy (train.dp_clip) "
                              "clips each client's update on the server, which secure "
                              "aggregation hides; use train.dp_mode = \"local\" (clipped and "
                              "noised on the client)")
        if not isinstance(self.inner, Mean):
            raise ConfigError(f"{self.key}: differential privacy takes the mean of the clipped "
                              f"updates; it does not combine with aggregation = "
                              f"{self.inner.describe()}")
        super().check(setting)


def parse_rule(rule: str) -> Aggregation:
    """`train.aggregation`: mean, median or trimmed:<fraction in [0, 0.5)>."""
    name, _, argument = rule.partition(":")
    if name in ("mean", "median") and not argument:
        return Mean() if name == "mean" else Median()
    if name == "trimmed":
        try:
            fraction = float(argument)
        except ValueError:
            fraction = math.nan
        if not 0 <= fraction < 0.5:
            raise ConfigError(
                f"train.aggregation: trimmed needs a fraction in [0, 0.5) cut at each end, "
                f"e.g. trimmed:0.1; got {rule!r}"
            )
        return Trimmed(fraction)
    raise ConfigError(
        f"train.aggregation: unknown {rule!r} (choose from mean, median, trimmed:<fraction>)"
    )


def aggregation_for(
    train: TrainConfig, method: Method, num_clients: int, upload_codec: str = "dense",
    secure: bool = False,
) -> Aggregation:
    """The policy the settings ask for, checked against the method and the transport (`secure`:
    it delivers only the sum of the uploads)."""
    check_privacy(train)
    policy = parse_rule(train.aggregation)
    if secure:
        if not isinstance(policy, Mean):
            raise ConfigError(f"flower.secagg: train.aggregation = {train.aggregation!r} needs "
                              "each client's update, which secure aggregation hides; use "
                              "\"mean\"")
        policy = SecureSum()
    if train.dp_clip > 0 and train.dp_mode == "central":
        policy = CentralDP(policy, train.dp_clip, train.dp_noise)
    count = max(1, round(train.clients_per_round * num_clients))
    setting = Setting(method, upload_codec, count, each_upload=not secure)
    policy.check(setting)
    if train.dp_clip > 0 and train.dp_mode == "local":
        # The client clips and noises its own update (floral.engines.worker) exactly as the
        # central policy does the server's: it needs of the method what that policy needs.
        CentralDP(parse_rule(train.aggregation), train.dp_clip, train.dp_noise).check(
            replace(setting, each_upload=True))
    return policy


def robustness_warning(policy: Aggregation, sampled: int, attackers: int) -> str | None:
    """One line when `attackers` bad clients, `sampled` a round, can outnumber what the policy
    removes in a round where they are sampled together; None when it withstands them."""
    worst = min(attackers, sampled)
    if worst <= policy.withstands(sampled):
        return None
    return (f"train.aggregation = {policy.describe()} removes at most "
            f"{policy.withstands(sampled)} bad update(s) of the {sampled} a round aggregates; "
            f"{worst} of the attack's {attackers} clients may be sampled together")


def check_privacy(train: TrainConfig) -> None:
    """The `train.dp_*` settings' values: one-line errors naming the key."""
    if train.dp_clip < 0 or train.dp_noise < 0:
        raise ConfigError("train.dp_clip and train.dp_noise: must be 0 or more, got "
                          f"{train.dp_clip} and {train.dp_noise}")
    check_choice("train.dp_mode", train.dp_mode, DpMode)
    if not 0 < train.dp_delta < 1:
        raise ConfigError(f"train.dp_delta: must be in (0, 1), got {train.dp_delta}")
    if train.dp_clip == 0 and train.dp_noise > 0:
        raise ConfigError("train.dp_noise: needs train.dp_clip > 0 (the noise is a multiple of "
                          "the clipping bound)")


# -- the statistics ---------------------------------------------------------------------------
@torch.no_grad()
def robust_upload(uploads: Sequence[Mapping[str, torch.Tensor]], rule: str) -> TensorDict:
    """One upload standing for all of them under a robust rule: for every tensor, the
    coordinate-wise median (`median`) or trimmed mean (`trimmed:<fraction>`: that fraction of
    the clients cut at each end, coordinate by coordinate) of the clients' deltas, sent with
    their summed weight, so that the weighted mean of this one upload is that statistic.

    Needs one weight per tensor and client (FedAvg-style uploads); clients of weight 0 (no
    examples) take no part. Unlike the mean, it needs each client's delta, not only the sum.
    """
    name, _, argument = rule.partition(":")
    trim = float(argument) if name == "trimmed" else 0.0
    robust: TensorDict = {}
    for tensor_name in [n for n in uploads[0] if not n.endswith(WEIGHT_SUFFIX)]:
        weights = [u[tensor_name + WEIGHT_SUFFIX] for u in uploads]
        if any(w.numel() != 1 for w in weights):
            raise ValueError(
                f"{tensor_name!r} is uploaded with a weight per part (as FLoRAL's adaptors are); "
                f"train.aggregation = {rule!r} needs one weight per tensor"
            )
        live = [(u[tensor_name] / w, w) for u, w in zip(uploads, weights) if float(w) > 0]
        total = sum((w for _, w in live), torch.zeros(()))
        if not live:
            robust[tensor_name] = torch.zeros_like(uploads[0][tensor_name])
        else:
            ordered = torch.stack([d for d, _ in live]).sort(dim=0).values
            k = len(live)
            if name == "median":
                middle = (ordered[(k - 1) // 2] + ordered[k // 2]) / 2
            else:
                cut = min(int(trim * k), (k - 1) // 2)
                middle = ordered[cut : k - cut].mean(dim=0)
            robust[tensor_name] = middle * total
        robust[tensor_name + WEIGHT_SUFFIX] = total
    return robust


@torch.no_grad()
def private_upload(
    uploads: Sequence[Mapping[str, torch.Tensor]], clip: float, noise: float,
    generator: torch.Generator, count: float | None = None,
) -> TensorDict:
    """One upload standing for all under DP-FedAvg: every client's update clipped to L2 norm
    `clip`, summed with equal weights, plus Gaussian noise of standard deviation
    `noise * clip` on every coordinate, sent with weight `count` (default: the number of
    uploads) on every tensor and part, so that its mean is the noisy sum divided by `count`.

    A client's update is `private_update`: its deltas over all tensors together, where a
    tensor uploaded with a weight per part (FLoRAL's adaptor c, weight n * pi_c) has each part
    scaled by its share of the weight (pi_c, in [0, 1]). The clip bounds that whole vector, so
    one client, whatever its data, examples n and router pi, moves the sum by at most `clip`
    in L2 norm: adding or removing a client is the Gaussian mechanism of multiplier `noise`
    that the accountant counts (`floral.train.privacy`), and nothing else is released. The
    clients' weights (n, and n * pi, which tell their routers and, summed, the clusters'
    sizes) never reach the result: every tensor and part is divided by the public `count`,
    which is post-processing. For an adaptor this is the pi-weighted mean over all `count`
    clients, its usage share of FLoRAL's own mean (the share is private); a public
    denominator below `count`, such as count / C, would raise the noise on little-used
    adaptors above the base's. Every client counts once, not by n.

    `generator` must be secret (`floral.train.privacy.secret_generator`): whoever can replay
    it can subtract the noise.
    """
    names = [n for n in uploads[0] if not n.endswith(WEIGHT_SUFFIX)]
    total = {name: torch.zeros_like(uploads[0][name]) for name in names}
    for upload in uploads:
        update = private_update(upload, names)
        norm = torch.linalg.vector_norm(torch.stack([update[n].norm() for n in names]))
        scale = min(1.0, clip / max(float(norm), 1e-12))
        for name in names:
            total[name] += scale * update[name]
    clients = float(len(uploads)) if count is None else count
    private: TensorDict = {}
    for name in names:
        draw = torch.randn(total[name].shape, generator=generator, dtype=total[name].dtype)
        private[name] = total[name] + noise * clip * draw
        weight = uploads[0][name + WEIGHT_SUFFIX]
        private[name + WEIGHT_SUFFIX] = (
            torch.tensor(clients) if weight.numel() == 1 else torch.full_like(weight, clients)
        )
    return private


def private_update(upload: Mapping[str, torch.Tensor], names: Sequence[str]) -> TensorDict:
    """What differential privacy clips of one upload: every tensor's weighted delta divided by
    the sum of its weights, so a tensor with one weight gives its delta, and a tensor with a
    weight per part (n * pi_c) gives each part's delta times its share pi_c, in [0, 1]. A
    tensor whose weights sum to zero gives zeros."""
    update: TensorDict = {}
    for name in names:
        total = float(upload[name + WEIGHT_SUFFIX].sum())
        update[name] = (upload[name] / total if total > 0
                        else torch.zeros_like(upload[name]))
    return update
