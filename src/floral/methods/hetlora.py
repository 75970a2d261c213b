"""HetLoRA (Cho et al., arXiv 2401.06432): ranks per client, zero-padded aggregation.

The server keeps LoRA factors of the largest rank R. A client of rank r_k takes their first
r_k ranks (the others are zero while it trains, and stay zero: their gradients vanish) and
sends back only those r_k ranks. The server zero-pads every client's factors to R and takes
the examples-weighted mean:

    A_new = sum_k p_k pad(A_k)        (same for B)

so ranks beyond r_k count as zero from client k and the higher ranks, which fewer clients
train, are shrunk towards zero. `aggregation = "per-rank"` instead averages each rank over
the clients that hold it. The adaptive bias has no rank and is averaged as usual.

The download is the same rank-R payload for every client (one broadcast); a server that sent
each client only its first r_k ranks would send a fraction r_k / R of those factor bytes. The
model evaluated is the global one at rank R.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from floral.config import check_choice, choices
from floral.data import FederatedTask
from floral.methods.base import (
    WEIGHT_SUFFIX,
    ClientJob,
    ClientUpdate,
    ServerState,
    weighted_mean_delta,
)
from floral.methods.lora_common import (
    LoraMethod,
    LoraOptions,
    first_ranks,
    is_ranked,
    truncated,
)
from floral.train.optim import ServerOptimizer
from floral.train.state import StateSlots, TensorDict

__all__ = ["AGGREGATIONS", "Aggregation", "HetLoRA", "HetLoRAOptions", "zero_padded"]

Aggregation = Literal["zero-padded", "per-rank"]
AGGREGATIONS: tuple[str, ...] = choices(Aggregation)


@dataclass
class HetLoRAOptions(LoraOptions):
    aggregation: Aggregation = "zero-padded"


def zero_padded(
    upload: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor], per_rank: bool
) -> TensorDict:
    """An upload of r_k ranks as an upload of the global rank R.

    The client sent w (theta_k - theta) on its ranks. Zero-padding its factors makes the
    rest 0 - theta there, i.e. -w theta in the upload; per rank, the rest gets weight zero.
    """
    full = dict(upload)
    for name, sent in upload.items():
        target = global_state.get(name)
        if not is_ranked(name) or target is None or sent.shape[1] == target.shape[1]:
            continue
        rank, weight = sent.shape[1], upload[name + WEIGHT_SUFFIX]
        padded = torch.zeros_like(target)
        padded[:, :rank] = sent
        if per_rank:
            mask = torch.zeros(target.shape[:2] + (1,) * (target.dim() - 2))
            mask[:, :rank] = 1.0
            full[name + WEIGHT_SUFFIX] = weight * mask
        else:
            padded[:, rank:] = -weight * target[:, rank:]
        full[name] = padded
    return full


class HetLoRA(LoraMethod):
    name = "hetlora"
    description = "Ranks per client; zero-padded mean of LoRA factors, clients take the first r_k."
    Options = HetLoRAOptions
    ranked_uploads = True
    batchable = False  # each client trains the first r_k ranks of the global factors
    plain_mean = False  # zero-padded ranks
    mixture_mean = False
    secure_sum = False  # ranks per client: each upload is read on its own

    def build_model(self, model: nn.Module, task: FederatedTask) -> nn.Module:
        check_choice("method.aggregation", self.options.aggregation, Aggregation)
        return super().build_model(model, task)

    def client_step(self, slots: StateSlots, job: ClientJob) -> ClientUpdate:
        rank = self.rank_of(job.client)
        if rank is None:
            return super().client_step(slots, job)
        update = super().client_step(slots, job.with_global(truncated(job.global_state, rank)))
        update.upload = first_ranks(update.upload, rank)
        return update

    def aggregate(
        self,
        state: ServerState,
        uploads: Sequence[Mapping[str, torch.Tensor]],
        optimizer: ServerOptimizer,
    ) -> TensorDict:
        per_rank = self.options.aggregation == "per-rank"
        full = [zero_padded(upload, state.global_state, per_rank) for upload in uploads]
        return optimizer.step(state.global_state, weighted_mean_delta(full))
