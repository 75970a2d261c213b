"""The method contract: roles, a client step, a server update, and what the method declares.

A method is a description, not a runner. It says which tensors are global (sent and
aggregated), private (never leave the client) or frozen (never change), how a client trains,
what it uploads and how the server combines uploads. Engines move the tensors.

The default behaviour is FedAvg's: everything global, examples-weighted mean. Methods override
the small hooks below (`build_model`, `roles`, `param_groups`, `upload_weights`, ...) and only
replace `client_step` or `server_update` when their algorithm really differs.

Uploads are *sums*: for every global tensor the client sends `w * (theta_k - theta)` and the
weight `w` itself (under `name + WEIGHT_SUFFIX`). The server only adds uploads together and
divides, so per-client quantities such as FLoRAL's router never leave the client and the
protocol is compatible with secure aggregation.

What engines read of a method is declared here, with defaults, never found by reflection:
`batchable` (the default client step may run many clients at once), `backward_hook` (between
backward and the optimizer step), `check_upload` (whether one upload may be aggregated), and
`init_server_state` (tensors the server keeps between rounds: checkpointed with the run, never
sent to clients).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import nn

from floral.data import ClientData, FederatedTask
from floral.methods.checks import contract_problems, value_problems
from floral.train.device import Placement, compiled, on_cpu, seeded_rng
from floral.train.loop import (
    TrainConfig,
    build_optimizer,
    round_lr_factor,
    set_lr_factor,
    train_epochs,
)
from floral.train.objective import Objective
from floral.train.optim import ServerOptimizer
from floral.train.state import (
    OPTIMIZER_PREFIX,
    WEIGHT_SUFFIX,
    StateSlots,
    TensorDict,
    frozen_module_names,
    is_optimizer_key,
)

__all__ = [
    "WEIGHT_SUFFIX",
    "ClientJob",
    "ClientUpdate",
    "Method",
    "NoOptions",
    "Role",
    "ServerState",
    "local_epochs",
    "optimizer_state_of",
    "private_update",
    "private_upload",
    "restore_optimizer_state",
    "robust_upload",
    "round_optimizer",
    "split_roles",
    "sum_uploads",
    "weighted_deltas",
    "weighted_mean_delta",
]


class Role(str, enum.Enum):
    GLOBAL = "global"  # sent down, trained, sent up, aggregated
    PRIVATE = "private"  # lives with one client only
    FROZEN = "frozen"  # identical everywhere and never trained


@dataclass
class NoOptions:
    """Methods without options of their own."""


@dataclass(frozen=True)
class ClientJob:
    """Everything one client step depends on; the step is a pure function of it."""

    global_state: Mapping[str, torch.Tensor]  # as the client received it (download codec)
    private_state: Mapping[str, torch.Tensor]
    data: ClientData
    config: TrainConfig
    objective: Objective
    seed: int  # from (run seed, round, client) only
    round: int = 1
    placement: Placement = Placement()  # device, precision, compilation: not the numbers' source

    @property
    def client(self) -> int:
        return self.data.client_id

    def with_global(self, global_state: Mapping[str, torch.Tensor]) -> ClientJob:
        return replace(self, global_state=global_state)


@dataclass
class ClientUpdate:
    """What one client step produces."""

    upload: TensorDict  # exactly the tensors that cross the network
    num_examples: int
    private: TensorDict  # the client's new private state, kept by the engine
    metrics: dict[str, float] = field(default_factory=dict)

    def on_cpu(self) -> ClientUpdate:
        """This update with its tensors on the CPU, where everything leaving a step lives."""
        return replace(self, upload=on_cpu(self.upload), private=on_cpu(self.private))


@dataclass
class ServerState:
    """What the server holds between rounds: the global tensors (all that is ever sent down)
    and the method's own tensors (`Method.init_server_state`), which stay on the server."""

    global_state: TensorDict
    method_state: TensorDict = field(default_factory=dict)


class Method:
    """FedAvg behaviour; subclasses override the hooks that make them what they are."""

    name: ClassVar[str] = "fedavg"
    description: ClassVar[str] = "Federated averaging of the whole model, weighted by examples."
    Options: ClassVar[type] = NoOptions
    # Whether engines may run this method's clients as one batch (floral.engines.batched),
    # which reproduces the default client step (SGD over `param_groups`, then
    # `upload_weights`): a method that replaces `client_step` or `train_locally` sets False.
    batchable: ClassVar[bool] = True
    # Whether `server_update` takes the weighted mean of the uploads' deltas with one weight per
    # tensor, so that a robust rule (`train.aggregation`, `robust_upload`) or differential
    # privacy (`train.dp_clip`, `private_upload`) may stand in for the mean; False where
    # uploads are combined otherwise or weighted per part (FLoRAL's adaptors, stacking,
    # zero-padding).
    plain_mean: ClassVar[bool] = True
    # Whether the per-part weights are n times a mixture over the parts (FLoRAL's n * pi per
    # adaptor) and the server takes their weighted mean: differential privacy may then stand
    # in for the mean too, clipping the pi-weighted update (`private_upload`).
    mixture_mean: ClassVar[bool] = False
    # Whether `server_update` needs only the element-wise sum of the round's uploads, all of
    # the global tensors' shapes, so that secure aggregation may hand it that sum alone;
    # False where it looks at each upload (ranks per client, stacking).
    secure_sum: ClassVar[bool] = True
    # Whether the state of the local optimizer (AdamW's moments) for the private tensors a
    # client trains is kept with its private state between its rounds; never uploaded.
    keeps_optimizer_state: ClassVar[bool] = True

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    # -- the model ---------------------------------------------------------------------------
    def build_model(self, model: nn.Module, task: FederatedTask) -> nn.Module:
        """Turn the task's plain model into this method's model (attach adaptors, ...)."""
        return model

    def roles(self, model: nn.Module) -> dict[str, Role]:
        """Role of every tensor in `model.state_dict()`; a module marked frozen (a quantized
        base layer) holds only frozen ones."""
        frozen = tuple(f"{name}." for name in frozen_module_names(model))
        return {
            name: Role.FROZEN if name.startswith(frozen) else _default_role(t)
            for name, t in model.state_dict().items()
        }

    def init_private(self, initial: TensorDict, client: ClientData) -> TensorDict:
        """A client's private state before its first round, from the freshly built model's."""
        return {k: v.clone() for k, v in initial.items()}

    def router_weights(self, private: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """A client's learned mixture weights pi (C,) from its private state, or None.

        None for methods without a learned router, and for oracle routers (told, not learned).
        Engines score cluster recovery with it: each client's argmax pi against its cluster.
        """
        return None

    # -- the client step ---------------------------------------------------------------------
    def param_groups(self, model: nn.Module, config: TrainConfig) -> list[dict]:
        """SGD parameter groups with their learning rates; trainable parameters only."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": config.lr}]

    def backward_hook(self, model: nn.Module) -> Callable[[], None] | None:
        """What runs between backward and the optimizer step (gradient preconditioning), or
        None. The batched engine runs it on each client's view of the model."""
        return None

    def upload_weights(self, model: nn.Module, global_names: Sequence[str], n: int) -> TensorDict:
        """Aggregation weight of each global tensor, broadcastable to its shape."""
        weight = torch.tensor(float(n))
        return {name: weight for name in global_names}

    def client_step(self, slots: StateSlots, job: ClientJob) -> ClientUpdate:
        """Train on one client's data: a pure function of `job` (the model is scratch)."""
        slots.load(job.global_state)
        slots.load(job.private_state)  # the model's tensors; kept optimizer state is skipped
        train_loss = self.train_locally(slots, job)
        return self.finish_step(slots, job, train_loss)

    def finish_step(self, slots: StateSlots, job: ClientJob, train_loss: float) -> ClientUpdate:
        """The upload and the new private state of the trained model loaded in `slots`."""
        n = job.data.num_train
        weights = self.upload_weights(slots.model, list(job.global_state), n)
        upload = weighted_deltas(slots, job.global_state, weights)
        config = job.config
        if config.dp_clip > 0 and config.dp_mode == "local":  # noised here, before it leaves
            noise = torch.Generator().manual_seed(job.seed ^ 0xD1FF)  # on the CPU, as the upload
            upload = private_upload([on_cpu(upload)], config.dp_clip, config.dp_noise, noise)
        names = [name for name in job.private_state if not is_optimizer_key(name)]
        private = slots.snapshot(names)
        private.update(self.kept_optimizer_state(slots, job, names))
        return ClientUpdate(upload, n, private, {"train_loss": train_loss})

    def train_locally(self, slots: StateSlots, job: ClientJob) -> float:
        """The local epochs on the model as loaded; returns the mean training loss.

        Methods whose upload is not a delta of the global tensors (FLoRA sends its trained
        factors) call this and build their upload themselves.
        """
        generator = torch.Generator().manual_seed(job.seed)
        optimizer = self.local_optimizer(slots, job)
        hook = self.backward_hook(slots.model)
        return local_epochs(slots, job, optimizer, job.config.local_epochs, generator, hook)

    def local_optimizer(self, slots: StateSlots, job: ClientJob) -> torch.optim.Optimizer:
        """The client's optimizer over `param_groups`, built once per model and reset for each
        step, its learning rates set for the round (`train.lr_schedule`), holding the kept
        state of this client's private tensors (`keeps_optimizer_state`).

        Resetting keeps each client step a pure function of its inputs; reusing the object
        saves rebuilding groups for every client.
        """
        config = job.config
        optimizer = round_optimizer(
            slots,
            job,
            self._optimizer_key(config),
            lambda: build_optimizer(self.param_groups(slots.model, config), config),
        )
        if self.keeps_optimizer_state:
            restore_optimizer_state(optimizer, slots, job.private_state)
        return optimizer

    def kept_optimizer_state(
        self, slots: StateSlots, job: ClientJob, private_names: Sequence[str]
    ) -> TensorDict:
        """The optimizer state of the private tensors just trained, as private state entries
        (`OPTIMIZER_PREFIX`); none for SGD, which restarts every round as FedAvg's does."""
        if not self.keeps_optimizer_state or job.config.optimizer == "sgd":
            return {}
        optimizer = slots.memo(self._optimizer_key(job.config), lambda: None)
        if optimizer is None:
            return {}
        return optimizer_state_of(optimizer, slots, private_names)

    def _optimizer_key(self, config: TrainConfig) -> tuple:
        return ("local_optimizer", id(self), id(config))

    # -- the server --------------------------------------------------------------------------
    def init_server_state(
        self, model: nn.Module, global_state: Mapping[str, torch.Tensor]
    ) -> TensorDict:
        """Tensors the server keeps for this method, from the freshly built model and its
        global tensors: passed to and returned by `server_update`, checkpointed with the run,
        never sent to clients. A server that builds no model (Flower's) gets them with the
        initial global tensors from a client node, which built the same model."""
        return {}

    def check_upload(self, state: ServerState, upload: Mapping[str, torch.Tensor]) -> list[str]:
        """What is wrong with one decoded upload, as short phrases; empty when it may be
        aggregated. The default: finite values, non-negative floating-point weights, and for
        every global tensor a delta of its shape and dtype and a weight broadcastable to it."""
        return value_problems(upload) or contract_problems(state.global_state, upload)

    def server_update(
        self,
        state: ServerState,
        uploads: Sequence[Mapping[str, torch.Tensor]],
        optimizer: ServerOptimizer,
    ) -> ServerState:
        """The server's new state from the round's uploads."""
        if not uploads or not state.global_state:
            return ServerState(dict(state.global_state), dict(state.method_state))
        new_global = optimizer.step(state.global_state, weighted_mean_delta(uploads))
        return ServerState(new_global, dict(state.method_state))



def round_optimizer(
    slots: StateSlots, job: ClientJob, key: Any, build: Callable[[], torch.optim.Optimizer]
) -> torch.optim.Optimizer:
    """The optimizer built once per scratch model under `key`, reset for this client step
    (no state carried over from another client), its learning rates set for the job's round
    (`train.lr_schedule`)."""
    config = job.config
    optimizer = slots.memo(key, build)
    optimizer.state.clear()
    if config.lr_schedule != "constant" or config.warmup_rounds:
        set_lr_factor(optimizer, round_lr_factor(config, job.round))
    return optimizer


def local_epochs(
    slots: StateSlots,
    job: ClientJob,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    generator: torch.Generator,
    after_backward: Callable[[], None] | None = None,
) -> float:
    """`epochs` passes of `optimizer` over the client's training data, on the job's placement:
    the forward compiled once per scratch model (`engine.compile`), router noise and dropout
    seeded by the job. Returns the mean training loss."""
    model, config, placement = slots.model, job.config, job.placement
    forward = None
    if placement.compile:  # one compiled forward per scratch model, for every client
        forward = slots.memo(("compiled", id(model)), lambda: compiled(model))
    with seeded_rng(job.seed, placement.device):  # router noise, dropout
        return train_epochs(
            model,
            optimizer,
            job.data.x_train,
            job.data.y_train,
            job.objective.loss,
            batch_size=config.batch_size,
            epochs=epochs,
            generator=generator,
            after_backward=after_backward,
            placement=placement,
            accumulation=config.grad_accumulation,
            max_grad_norm=config.max_grad_norm,
            forward=forward,
        )

def _default_role(tensor: torch.Tensor) -> Role:
    # Integer buffers (BatchNorm's num_batches_tracked) are counters, not weights to average.
    return Role.GLOBAL if tensor.is_floating_point() else Role.PRIVATE


def split_roles(roles: Mapping[str, Role]) -> tuple[list[str], list[str]]:
    """(global names, private names) in a stable order."""
    global_names = [n for n, r in roles.items() if r is Role.GLOBAL]
    private_names = [n for n, r in roles.items() if r is Role.PRIVATE]
    return global_names, private_names


@torch.no_grad()
def weighted_deltas(
    slots: StateSlots, global_state: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor]
) -> TensorDict:
    """The upload: `w * (theta_k - theta)` and `w` for every global tensor."""
    names = list(global_state)
    if not names:
        return {}
    deltas = torch._foreach_sub(
        [slots.tensors[n] for n in names], [global_state[n] for n in names]
    )
    # A weight may come from the CPU (n) while the model is on a GPU.
    torch._foreach_mul_(deltas, [weights[n].to(d.device) for n, d in zip(names, deltas)])
    upload: TensorDict = {}
    for name, delta in zip(names, deltas):
        upload[name] = delta
        upload[name + WEIGHT_SUFFIX] = weights[name]
    return upload


@torch.no_grad()
def weighted_mean_delta(uploads: Sequence[Mapping[str, torch.Tensor]]) -> TensorDict:
    """Sum the uploads, then divide each tensor by its summed weight.

    Where a weight sums to zero (an adaptor no sampled client uses), the update is zero.
    """
    totals = sum_uploads(uploads)
    delta: TensorDict = {}
    for name, total in totals.items():
        if name.endswith(WEIGHT_SUFFIX):
            continue
        weight = totals[name + WEIGHT_SUFFIX]
        if weight.numel() == 1 and weight.item() > 0:
            delta[name] = total.div_(weight)  # the common case: one positive scalar
            continue
        safe = torch.where(weight > 0, weight, torch.ones_like(weight))
        delta[name] = torch.where(weight > 0, total / safe, torch.zeros_like(total))
    return delta


@torch.no_grad()
def sum_uploads(uploads: Sequence[Mapping[str, torch.Tensor]]) -> TensorDict:
    """Element-wise sum of uploads; all the server ever does with them (secure-aggregation safe)."""
    names = list(uploads[0])
    if any(upload.keys() != uploads[0].keys() for upload in uploads):
        names = list(dict.fromkeys(n for upload in uploads for n in upload))
    totals: dict[str, torch.Tensor] = {}
    for upload in uploads:
        present = [n for n in names if n in upload]
        fresh = [n for n in present if n not in totals]
        for n in fresh:
            totals[n] = upload[n].clone()
        rest = [n for n in present if n in totals and n not in fresh]
        if rest:
            torch._foreach_add_([totals[n] for n in rest], [upload[n] for n in rest])
    return totals


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


def optimizer_state_of(
    optimizer: torch.optim.Optimizer, slots: StateSlots, names: Sequence[str]
) -> TensorDict:
    """The optimizer's per-tensor state of the named model tensors, on the CPU, as entries
    `OPTIMIZER_PREFIX + "<state key>/<tensor name>"`."""
    kept: TensorDict = {}
    for name in names:
        for key, value in optimizer.state.get(slots.tensors[name], {}).items():
            if isinstance(value, torch.Tensor):
                kept[f"{OPTIMIZER_PREFIX}{key}/{name}"] = value.detach().to("cpu", copy=True)
    return kept


def restore_optimizer_state(
    optimizer: torch.optim.Optimizer, slots: StateSlots, private: Mapping[str, torch.Tensor]
) -> None:
    """Put kept entries (`optimizer_state_of`) back as the state of their tensors."""
    for entry, value in private.items():
        if not is_optimizer_key(entry):
            continue
        key, _, name = entry[len(OPTIMIZER_PREFIX):].partition("/")
        tensor = slots.tensors[name]
        # AdamW keeps its step count on the CPU and its moments beside the tensor.
        device = "cpu" if key == "step" else tensor.device
        optimizer.state[tensor][key] = value.to(device, copy=True)
