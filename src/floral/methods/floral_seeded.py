"""`floral-seeded`: FLoRAL whose routed adaptors are seeded from clusters of the clients' updates.

A router can only tell adaptors apart once they differ in a way that matters to its client.
Started from B = 0, the routed adaptors first learn what every client has in common (on
translations, the output format: over 90% of a client's first gradient is the mean of all
clients'), and what little differs between them at first is noise that the routers take for
clusters and then keep.

So this FLoRAL has a shared adaptor (`shared_adaptor`, always on, averaged over every client)
and its routed adaptors wait: until round `seed_round` their weight in every client's mixture
is 0 (the router's global `active` switch), so they and the routers stand still while the
shared adaptor learns the common part, as FedIT would. At round `seed_round` the
server takes each client's update of the shared adaptor, removes their mean, clusters them by
direction into C groups (k-means on the unit sphere, k-means++ starts, the best of several),
sets routed adaptor c to where group c's updates differ from the mean (B_c the difference of
the group's mean B update from the overall one, A_c the shared adaptor's new A) and switches
the routed adaptors on. A client whose router has never moved (its logits are still zero)
then starts it from its own losses: it scores its training data under each routed adaptor
(with the shared one) and puts logit `start_logit` on the best, 0 on the others. From then on
it is FLoRAL: the router trains by the client's loss and may still move to another adaptor.

With `train.clients_per_round` below 1 only that round's clients are clustered; every client,
sampled then or not, starts its router by its own losses the first time it trains after.

The server reads each client's update of the shared adaptor on its own in that round, as any
clustered-FL server does (`secure_sum` is false); it is not told the clients' routers, and it
never sends a client its group: a client finds its group's adaptor by its own loss. Differential
privacy and robust aggregation, which hand the server one combined upload, are refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, cast

import torch
from torch import nn

from floral.adapters import Router
from floral.config import Range
from floral.data import FederatedTask, TaskConfig
from floral.errors import ConfigError
from floral.methods.base import WEIGHT_SUFFIX, ClientJob, Role, ServerState
from floral.methods.floral import Floral, FloralOptions, routed_names
from floral.methods.routing import ROUTER_PREFIX
from floral.train.loop import TrainConfig
from floral.train.optim import ServerOptimizer
from floral.train.state import StateSlots, TensorDict

__all__ = [
    "FloralSeeded",
    "FloralSeededOptions",
    "cluster_directions",
    "group_offsets",
    "hold_routed",
    "seed_routed",
    "seeded_losses",
    "shared_updates",
]

LOGITS = ROUTER_PREFIX + "logits"
ACTIVE = ROUTER_PREFIX + "active"  # the routed adaptors' switch: 0 until they are seeded
ROUNDS = "rounds"  # the server's own count of rounds, while the seeding is ahead

RESTARTS = 20
ITERATIONS = 50


@dataclass
class FloralSeededOptions(FloralOptions):
    shared_adaptor: bool = True
    seed_round: int = 2  # the round whose updates seed the routed adaptors (>= 1)
    # A fresh router's logit on its best seeded adaptor: pi = e^s / (e^s + C - 1) there,
    # 0.71 for s = 2 and C = 4, sure enough to train that adaptor most, not so sure that the
    # router cannot leave it. 0: the router starts uniform and finds its adaptor by gradient.
    start_logit: float = 2.0

    RANGES: ClassVar[dict[str, Range]] = {
        "seed_round": Range("[1, inf)"),
        "start_logit": Range("[0, inf)"),
    }


class FloralSeeded(Floral):
    name = "floral-seeded"
    description = (
        "FLoRAL with a shared adaptor; the routed adaptors start from clusters of the clients' "
        "updates of it, then routers learn as in FLoRAL."
    )
    Options = FloralSeededOptions
    batchable = False  # a fresh router is started from the client's losses first
    plain_mean = False
    mixture_mean = False  # the seeding reads each upload, not a noised mean
    secure_sum = False

    def check_against(self, train: TrainConfig, task: TaskConfig) -> None:
        _check_options(self.options)
        if self.options.seed_round > train.rounds:
            raise ConfigError(
                f"method.seed_round: {self.options.seed_round} is after the last round "
                f"(train.rounds = {train.rounds}): the routed adaptors would never be seeded"
            )

    def build_model(self, model: nn.Module, task: FederatedTask) -> nn.Module:
        _check_options(self.options)
        model = super().build_model(model, task)
        model.get_buffer(ACTIVE).zero_()  # the routed adaptors wait for their seeds
        return model

    def train_locally(self, slots: StateSlots, job: ClientJob) -> float:
        router = cast(Router, slots.model.floral_router)
        fresh = float(router.active) > 0 and not bool(router.logits.detach().any())
        if fresh and self.options.start_logit:
            losses = seeded_losses(slots.model, router, job)
            start = torch.zeros_like(router.logits)
            start[..., int(losses.argmin())] = self.options.start_logit
            slots.load({LOGITS: start})
        return super().train_locally(slots, job)

    def roles(self, model: nn.Module) -> dict[str, Role]:
        roles = super().roles(model)
        roles[ACTIVE] = Role.GLOBAL  # the server switches the routed adaptors on
        return roles

    def init_server_state(
        self, model: nn.Module, global_state: Mapping[str, torch.Tensor]
    ) -> TensorDict:
        return {ROUNDS: torch.zeros((), dtype=torch.int64)}

    def server_update(
        self,
        state: ServerState,
        uploads: Sequence[Mapping[str, torch.Tensor]],
        optimizer: ServerOptimizer,
    ) -> ServerState:
        new = super().server_update(state, uploads, optimizer)
        if not uploads:
            return new
        rounds = int(new.method_state[ROUNDS]) + 1
        new.method_state[ROUNDS] = torch.tensor(rounds)
        if rounds > self.options.seed_round:
            return new
        names = routed_names(uploads[0])
        routed = int(uploads[0][names[0] + WEIGHT_SUFFIX].numel()) - 1
        hold_routed(state.global_state, new.global_state, names, routed)
        if rounds == self.options.seed_round:
            seed_routed(new, uploads, names, routed, seed=rounds)
            new.global_state[ACTIVE] = torch.ones_like(new.global_state[ACTIVE])
        return new


def _check_options(opts: FloralSeededOptions) -> None:
    if opts.seed_round < 1:
        raise ConfigError(f"method.seed_round: must be >= 1, got {opts.seed_round}")
    if opts.start_logit < 0:
        raise ConfigError(f"method.start_logit: must be >= 0, got {opts.start_logit}")
    if not opts.shared_adaptor:
        raise ConfigError(
            "method.shared_adaptor = false: floral-seeded clusters the clients' updates of "
            "the shared adaptor (use floral for a router without one)"
        )
    if opts.router != "learned":
        raise ConfigError(
            f"method.router = {opts.router!r}: floral-seeded seeds a learned router "
            "(floral-oracle fixes it)"
        )


def shared_updates(
    uploads: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str], shared: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(each client's update of adaptor `shared`, flattened over `names`: (K, D);
    each client's weight for it: (K,))."""
    rows, weights = [], []
    for upload in uploads:
        weight = upload[names[0] + WEIGHT_SUFFIX].flatten()[shared].float()
        safe = weight if weight > 0 else torch.ones_like(weight)
        rows.append(torch.cat([upload[n][shared].flatten().float() / safe for n in names]))
        weights.append(weight)
    return torch.stack(rows), torch.stack(weights)


def cluster_directions(vectors: torch.Tensor, groups: int, seed: int) -> torch.Tensor:
    """Labels (K,) in [0, groups): k-means of the centred vectors' directions.

    Runs in the K-dimensional span of the points (from their Gram matrix), with k-means++
    starts drawn from `seed`; the best of `RESTARTS` runs by within-group squared distance.
    """
    centred = vectors - vectors.mean(dim=0, keepdim=True)
    unit = centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-12)
    gram = (unit @ unit.T).double()
    values, vecs = torch.linalg.eigh(gram)
    points = vecs * values.clamp_min(0).sqrt()  # rows: the points, up to a rotation
    count = len(points)
    if groups >= count:
        return torch.arange(count) % groups
    generator = torch.Generator().manual_seed(seed)
    best, best_cost = torch.zeros(count, dtype=torch.long), float("inf")
    for _ in range(RESTARTS):
        labels, cost = _kmeans(points, groups, generator)
        if cost < best_cost - 1e-12:
            best, best_cost = labels, cost
    return best


def _kmeans(
    points: torch.Tensor, groups: int, generator: torch.Generator
) -> tuple[torch.Tensor, float]:
    centres = _plus_plus(points, groups, generator)
    labels = torch.zeros(len(points), dtype=torch.long)
    for _ in range(ITERATIONS):
        distances = torch.cdist(points, centres) ** 2
        new = distances.argmin(dim=1)
        for group in range(groups):  # an empty group takes the point worst served
            if not (new == group).any():
                far = distances.min(dim=1).values.argmax()
                new[far] = group
        if torch.equal(new, labels):
            break
        labels = new
        centres = torch.stack([points[labels == g].mean(dim=0) for g in range(groups)])
    cost = float(((points - centres[labels]) ** 2).sum())
    return labels, cost


def _plus_plus(points: torch.Tensor, groups: int, generator: torch.Generator) -> torch.Tensor:
    first = int(torch.randint(len(points), (1,), generator=generator))
    centres = [points[first]]
    for _ in range(1, groups):
        distances = (torch.cdist(points, torch.stack(centres)) ** 2).min(dim=1).values
        if float(distances.sum()) <= 0:
            pick = int(torch.randint(len(points), (1,), generator=generator))
        else:
            pick = int(torch.multinomial(distances.float(), 1, generator=generator))
        centres.append(points[pick])
    return torch.stack(centres)


@torch.no_grad()
def seeded_losses(model: nn.Module, router: Router, job: ClientJob) -> torch.Tensor:
    """The mean loss (C,) of the client's training data under each routed adaptor alone (pi
    one-hot on it, with the shared adaptor), in eval mode: no router noise, no dropout."""
    was_training = model.training
    losses = []
    data = job.data
    for adaptor in range(router.num_adaptors):
        one_hot = torch.zeros(router.num_adaptors, device=router.logits.device)
        one_hot[adaptor] = 1.0
        router.fix(one_hot)
        result = job.objective.evaluate(model, data.x_train, data.y_train,
                                        job.config.eval_batch_size, job.placement)
        losses.append(result.loss_sum / max(result.count, 1))
    router.unfix()
    model.train(was_training)
    return torch.tensor(losses)


@torch.no_grad()
def hold_routed(old: Mapping[str, torch.Tensor], new: dict[str, torch.Tensor],
                names: Sequence[str], routed: int) -> None:
    """Adaptors [0, routed) of every tensor in `names` back to their values in `old`."""
    for name in names:
        tensor = new[name].clone()
        tensor[:routed] = old[name][:routed]
        new[name] = tensor


def group_offsets(
    values: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor, groups: int
) -> torch.Tensor:
    """(groups, D): where each group's updates point, apart from everyone's.

    Each client's update is scaled to the mean length first, so a client that moved more
    (a larger loss) does not pull its group's offset along the common direction; each offset
    is the group's weighted mean less the overall one, with its part along the overall mean
    removed: a group's offset helps its own clients, not everyone, so a client's loss under
    each seeded adaptor tells which group it belongs to.
    """
    lengths = values.norm(dim=1, keepdim=True)
    total = weights.sum().clamp_min(1e-12)
    scaled = values / lengths.clamp_min(1e-12) * (weights @ lengths.squeeze(1)) / total
    mean = (scaled * weights[:, None]).sum(dim=0) / total
    offsets = []
    for group in range(groups):
        w = weights[labels == group]
        centre = (scaled[labels == group] * w[:, None]).sum(dim=0) / w.sum().clamp_min(1e-12)
        offset = centre - mean
        offset -= (offset @ mean) / (mean @ mean).clamp_min(1e-12) * mean
        offsets.append(offset)
    return torch.stack(offsets)


@torch.no_grad()
def seed_routed(
    state: ServerState,
    uploads: Sequence[Mapping[str, torch.Tensor]],
    names: Sequence[str],
    routed: int,
    seed: int,
) -> torch.Tensor:
    """Set routed adaptors [0, routed) from clusters of the shared adaptor's (index `routed`)
    updates, in `state.global_state` (already updated with this round's mean); returns the
    clients' groups. Each routed A is the shared adaptor's new A; the other tensors (B, bias,
    norm deltas) get `group_offsets` of the clients' updates of them."""
    factors_a = [name for name in names if name.endswith("lora_A")]
    rest = [name for name in names if name not in factors_a]
    # Clustered on every tensor; the offsets are of the first columns, the rest's.
    updates, weights = shared_updates(uploads, rest + factors_a, routed)
    labels = cluster_directions(updates, routed, seed)
    sizes = [state.global_state[name][routed].numel() for name in rest]
    offsets = group_offsets(updates[:, : sum(sizes)], weights, labels, routed)
    for name in factors_a:
        tensor = state.global_state[name]
        tensor[:routed] = tensor[routed]
    for name, part in zip(rest, offsets.split(sizes, dim=1)):
        tensor = state.global_state[name]
        tensor[:routed] = part.reshape(routed, *tensor.shape[1:]).to(tensor.dtype)
    return labels
