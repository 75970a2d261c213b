"""FLoRAL with a hard-assignment (EM) router: each client picks the adaptor that fits it best.

FLoRAL's learned router (`floral`) starts symmetric: B = 0 and zero logits make every adaptor
the same function, so the router's gradient is zero at first, every adaptor is averaged over
all clients alike, and the clusters are found only when noise and the adaptors' random A
factors happen to break the tie, slowly and unreliably (docs/results.md measures it).

`floral-em` replaces the gradient-trained router by an alternating, IFCA-style rule:

- E-step (on the client, at the start of its step): evaluate the client's training data
  under each adaptor alone (one-hot pi, all C in one batched call) and route the client to
  the adaptor with the lowest loss. Exact ties, as at the start when all adaptors are equal,
  are broken uniformly at random from the client's seed, so the first rounds send random
  subsets of clients to each adaptor and the adaptors start to differ.
- M-step: FLoRAL's local training with pi fixed one-hot on that adaptor; adaptor c is then
  averaged over the clients that picked it (weights n_k * pi_kc, as in FLoRAL).

With `warmup_rank = R`, the adaptors start at rank R for `warmup_rounds` rounds, only to find
the clusters: the E-step compares adaptors by loss, and small adaptors differ too little
between some clusters (rotations, with ~10 samples per client) for the comparison to find
them, while larger ones find them early. Then the server restarts the model at rank `rank`
from its initial tensors and every client keeps the adaptor it was on (no more E-steps): of
the rank-R model only the assignment carries over (docs/results.md measures it).

With `holdout = h`, a fixed random fraction h of each client's training samples is never
trained on and the E-step reads only those: a client that trained an adaptor has made it fit
its own samples, and with ~10 samples per client that bias can hold a wrong assignment in
place (docs/results.md measures when this helps).

The server keeps its own state (`init_server_state`), never sent to clients: a moving average
of each adaptor's share of the upload weight (an adaptor whose share falls below a quarter of
1/C is reseeded as a copy of the most used one, k-means' cure for an empty cluster), and, with
a warm-up, the rounds run so far and the initial global tensors to restart from.

Nothing here knows the clusters: a client's choice uses only its own data and the global
tensors it receives, and it stays private (the fixed router weights are the client's private
state; the upload is FLoRAL's pi-weighted sums, so the server learns no more than in FLoRAL).
The oracle router is exactly this method with the E-step replaced by the true cluster, which
is why it is the bar to reach. A client never sampled keeps uniform weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import ClassVar

import torch
from torch import nn
from torch.func import functional_call, vmap

from floral.adapters.layers import AdaptedLayer, AdaptedLinear
from floral.adapters.rank import resolve_rank
from floral.adapters.spec import check_rank
from floral.config import Range, field_default
from floral.data import ClientData, FederatedTask, TaskConfig
from floral.errors import ConfigError
from floral.methods.base import WEIGHT_SUFFIX, ClientJob, ServerState
from floral.methods.floral import Floral, FloralOptions, routed_names
from floral.methods.routing import ROUTER_PREFIX
from floral.train.loop import TrainConfig
from floral.train.objective import LossFn
from floral.train.optim import ServerOptimizer
from floral.train.state import StateSlots, TensorDict

__all__ = [
    "FloralEM",
    "FloralEMOptions",
    "adaptor_losses",
    "adaptor_share",
    "holdout_split",
    "pick_adaptor",
    "reseed",
]

FIXED = ROUTER_PREFIX + "fixed"
# The server's own state.
USAGE = "usage"  # moving average of each adaptor's share of the upload weight
ROUNDS = "rounds"  # server rounds so far, with a rank warm-up
INITIAL = "initial/"  # + a global name: that tensor as first built, with a rank warm-up
USAGE_DECAY = 0.9  # per round, of the moving average
RESEED_BELOW = 0.25  # reseed an adaptor whose share falls below this / C
TIE_RTOL = 1e-5  # E-step losses this close (relative) count as a tie


@dataclass
class FloralEMOptions(FloralOptions):
    # Fraction of each client's training samples kept for the E-step and never trained on
    # (at least one when > 0): the loss of an adaptor the client has itself trained is biased
    # towards that adaptor, and with few samples the bias locks a wrong assignment in.
    holdout: float = 0.0
    # Rank warm-up: the adaptors start at this rank (an int or a fraction, as `rank`; 0 = off)
    # for `warmup_rounds` rounds. Larger adaptors differ more between clusters, so the E-step
    # finds the clusters while small ones would still tie. Then the model starts afresh at
    # `rank` and every client stays on the adaptor the warm-up found.
    warmup_rank: int | float = 0
    warmup_rounds: int = 150

    RANGES: ClassVar[dict[str, Range]] = {
        "holdout": Range("[0, 1)"),
        "warmup_rank": Range("[1, inf)", zero="off", fraction="(0, 1]"),
        "warmup_rounds": Range("[1, inf)"),
    }


class FloralEM(Floral):
    name = "floral-em"
    description = (
        "FLoRAL whose router is a hard assignment: each client picks the adaptor with the "
        "lowest loss on its data (EM), no oracle."
    )
    Options = FloralEMOptions
    batchable = False  # an E-step before the local epochs
    plain_mean = False  # adaptor usage counted from the weights
    mixture_mean = True
    secure_sum = True

    def check_against(self, train: TrainConfig, task: TaskConfig) -> None:
        opts: FloralEMOptions = self.options
        _check_options(opts)
        default = field_default(next(f for f in fields(opts) if f.name == "warmup_rounds"))
        if not opts.warmup_rank and opts.warmup_rounds != default:
            raise ConfigError(
                f"method.warmup_rounds: {opts.warmup_rounds} takes effect only with a rank "
                "warm-up (method.warmup_rank > 0)"
            )
        if opts.warmup_rank and opts.warmup_rounds >= train.rounds:
            raise ConfigError(
                f"method.warmup_rounds: {opts.warmup_rounds} must end before the last round "
                f"(train.rounds = {train.rounds}): the model restarts when the warm-up ends"
            )

    def build_model(self, model: nn.Module, task: FederatedTask) -> nn.Module:
        _check_options(self.options)
        model = super().build_model(model, task)
        if self.options.warmup_rank:
            check_linear_only(model)
        return model

    @property
    def attached_rank(self) -> int | float:
        return self.options.warmup_rank or self.options.rank

    @property
    def fixed_router(self) -> bool:
        return True  # pi is set by the E-step, never trained

    def router_weights(self, private: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        fixed = private.get(FIXED)
        if fixed is None:
            return None
        return fixed.mean(dim=0) if fixed.dim() == 2 else fixed

    def train_locally(self, slots: StateSlots, job: ClientJob) -> float:
        """E-step on the loaded model, then FLoRAL's local training routed one-hot on the
        chosen adaptor; the choice is written into the router's slot, so it becomes the
        client's private state and sets the upload weights."""
        data, check = holdout_split(job.data, self.options.holdout)
        if not self._assignment_fixed(slots, job.round):
            device = job.placement.device
            x, y = job.objective.crop(check.x_train, check.y_train)
            losses = adaptor_losses(slots.model, x.to(device), y.to(device), job.objective.loss)
            choice = pick_adaptor(losses, job.seed)
            one_hot = torch.zeros_like(slots.tensors[FIXED])
            one_hot[..., choice] = 1.0
            slots.load({FIXED: one_hot})
        return super().train_locally(slots, replace(job, data=data))

    def _assignment_fixed(self, slots: StateSlots, round_: int) -> bool:
        """After the warm-up, a client the warm-up assigned keeps its adaptor."""
        if not self.options.warmup_rank or round_ <= self.options.warmup_rounds:
            return False
        return bool((slots.tensors[FIXED] == 1).any())

    # -- the server --------------------------------------------------------------------------
    def init_server_state(
        self, model: nn.Module, global_state: Mapping[str, torch.Tensor]
    ) -> TensorDict:
        num_adaptors = model.get_buffer(FIXED).shape[-1]
        state = {USAGE: torch.full((num_adaptors,), 1.0 / num_adaptors)}
        if self.options.warmup_rank:
            state[ROUNDS] = torch.zeros((), dtype=torch.int64)
            state.update({INITIAL + name: t.clone() for name, t in global_state.items()})
        return state

    def server_update(
        self,
        state: ServerState,
        uploads: Sequence[Mapping[str, torch.Tensor]],
        optimizer: ServerOptimizer,
    ) -> ServerState:
        new = super().server_update(state, uploads, optimizer)
        own = new.method_state
        if ROUNDS in own:
            own[ROUNDS] = own[ROUNDS] + 1
            if int(own[ROUNDS]) == self.options.warmup_rounds:
                self._end_warmup(new)
        if not uploads:
            return new
        names, share = adaptor_share(uploads)
        if share is None:
            return new
        usage = USAGE_DECAY * own[USAGE] + (1 - USAGE_DECAY) * share
        own[USAGE] = usage
        if usage.min() < RESEED_BELOW / len(usage):
            reseed(new, names, target=int(usage.argmin()), source=int(usage.argmax()))
        return new

    def _end_warmup(self, state: ServerState) -> None:
        """Restart every global tensor from the initial model, with each adaptor at its final
        rank (A's first rows as initialized, B = 0), so that only the clients' assignments
        carry over."""
        opts = self.options
        model = state.global_state
        for name in model:
            model[name] = state.method_state[INITIAL + name].clone()
        for a in [name for name in model if name.endswith("lora_A")]:
            b = a.removesuffix("lora_A") + "lora_B"
            d_in, d_out = model[a].shape[-1], model[b].shape[-1]
            layer = a.removesuffix(".lora_A")
            rank = resolve_rank(opts.rank, d_in, d_out, opts.min_rank, layer=layer)
            model[a][:, rank:] = 0.0


def _check_options(options: FloralEMOptions) -> None:
    if not 0 <= options.holdout < 1:
        raise ConfigError(f"method.holdout: a fraction in [0, 1), got {options.holdout}")
    check_warmup(options)
    if options.shared_adaptor:
        raise ConfigError(
            "method.shared_adaptor = true: floral-em assigns each client to one adaptor; "
            "use floral or floral-seeded for a shared one"
        )


def check_warmup(options: FloralEMOptions) -> None:
    if not options.warmup_rank:
        return
    try:
        check_rank(options.warmup_rank)
    except ConfigError as error:
        raise ConfigError(f"method.warmup_{error}") from None
    if options.warmup_rounds < 1:
        raise ConfigError(f"method.warmup_rounds: must be >= 1, got {options.warmup_rounds}")
    # Comparable only in the same unit; the warm-up starts larger and is cut down to `rank`.
    if type(options.rank) is type(options.warmup_rank) and options.rank > options.warmup_rank:
        raise ConfigError(
            f"method.rank = {options.rank} is more than method.warmup_rank = "
            f"{options.warmup_rank}: the warm-up's adaptors are cut down to rank, never grown"
        )


def check_linear_only(model: nn.Module) -> None:
    """The warm-up cuts (C, R, d_in) x (C, R, d_out) factors: linear layers' only."""
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLayer) and not isinstance(module, AdaptedLinear):
            raise ConfigError(
                f"method.warmup_rank: layer {name!r} is a {type(module.base).__name__}; "
                "the rank warm-up cuts linear adaptors only (exclude the layer or drop warm-up)"
            )


def holdout_split(data: ClientData, fraction: float) -> tuple[ClientData, ClientData]:
    """(the samples to train on, the samples to assign by): a fixed random subset of
    max(1, round(fraction * n)) training samples, the same at every visit, is held out;
    with fraction 0, or a single sample, both are all of the data."""
    n = data.num_train
    if fraction <= 0 or n < 2:
        return data, data
    held = min(n - 1, max(1, round(fraction * n)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(data.client_id))
    keep, held_out = order[held:], order[:held]
    train = replace(data, x_train=data.x_train[keep], y_train=data.y_train[keep])
    check = replace(data, x_train=data.x_train[held_out], y_train=data.y_train[held_out])
    return train, check


@torch.no_grad()
def adaptor_losses(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: LossFn
) -> torch.Tensor:
    """Mean loss (C,) of (x, y) under each adaptor alone: pi one-hot on c, all c in one vmap."""
    was_training = model.training
    model.eval()  # no router noise, no dropout: the E-step compares the adaptors themselves
    fixed = model.get_buffer(FIXED)
    num_adaptors = fixed.shape[-1]
    one_hots = torch.eye(num_adaptors, dtype=fixed.dtype, device=fixed.device)
    if fixed.dim() == 2:  # a per-layer router: the same adaptor in every layer
        one_hots = one_hots[:, None, :].expand(-1, fixed.shape[0], -1)

    def outputs(pi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {FIXED: pi}, (x,))

    out = vmap(outputs)(one_hots)  # (C, n, outputs)
    model.train(was_training)
    return vmap(lambda o: loss(o, y))(out)


def adaptor_share(
    uploads: Sequence[Mapping[str, torch.Tensor]],
) -> tuple[list[str], torch.Tensor | None]:
    """The adaptor tensors' names, and each adaptor's share of this round's weight.

    Adaptor tensors are the ones uploaded with a weight per adaptor (n_k pi_k, C numbers);
    the others carry one number. Only sums of uploads are used, as in aggregation.
    """
    names = routed_names(uploads[0])
    if not names:
        return names, None
    total = torch.stack([u[names[0] + WEIGHT_SUFFIX].flatten() for u in uploads]).sum(dim=0)
    if total.sum() <= 0:
        return names, None
    return names, total / total.sum()


@torch.no_grad()
def reseed(state: ServerState, names: Sequence[str], target: int, source: int) -> None:
    """k-means' cure for an empty cluster: adaptor `target` (starving) becomes a copy of
    `source` (the most used, likely serving several clusters), and the two share its usage.

    The copies tie on every client of `source`, whose E-steps then split them at random;
    their training pulls the two copies apart, one cluster each.
    """
    for name in names:
        tensor = state.global_state[name].clone()
        tensor[target] = tensor[source]
        state.global_state[name] = tensor
    usage = state.method_state[USAGE].clone()
    usage[target] = usage[source] = usage[source] / 2
    state.method_state[USAGE] = usage


def pick_adaptor(losses: torch.Tensor, seed: int, rtol: float = TIE_RTOL) -> int:
    """argmin of `losses`; ties (within `rtol`) broken uniformly at random from `seed`.

    A NaN loss (a diverged adaptor) counts as infinitely bad; when all are, all tie.
    """
    losses = torch.nan_to_num(losses.cpu(), nan=float("inf"))
    best = losses.min()
    tied = torch.nonzero(losses <= best + rtol * best.abs()).flatten()
    if len(tied) == 1:
        return int(tied[0])
    generator = torch.Generator().manual_seed(seed)
    return int(tied[torch.randint(len(tied), (1,), generator=generator)])
