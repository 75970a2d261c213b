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

from floral.data import ClientData, FederatedTask, TaskConfig
from floral.methods.checks import batch_clear, contract_problems, value_problems
from floral.methods.upload_batch import UploadBatch, batch_deltas, private_rows
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
    "Capability",
    "ClientJob",
    "ClientUpdate",
    "Method",
    "NoOptions",
    "Role",
    "ServerState",
    "UploadBatch",
    "local_epochs",
    "optimizer_state_of",
    "restore_optimizer_state",
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


class Capability(str, enum.Enum):
    """What a method may offer the engines; each is a class flag of `Method`."""

    BATCHED = "batchable"
    MEAN_PER_TENSOR = "plain_mean"
    MEAN_PER_PART = "mixture_mean"
    SUM_ONLY = "secure_sum"


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
    # Where the upload is a row of clients trained together (`Method.finish_batch`): the
    # stacked uploads, which the server may check at once (`Method.check_upload_batch`).
    batch: UploadBatch | None = None

    def on_cpu(self) -> ClientUpdate:
        """This update with its tensors on the CPU, where everything leaving a step lives."""
        if self.batch is not None:  # `finish_batch` builds it there
            return self
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
    # What the method offers, declared, never found by looking at its code. The defaults offer
    # nothing: a method opts in to each, and tests/engines/test_capabilities.py checks every
    # registered method's declarations against what its steps and server do.
    #
    # Whether engines may run this method's clients as one batch (floral.engines.batched),
    # which reproduces the default client step (SGD over `param_groups`, then
    # `upload_weights`): only for methods that keep `client_step` and `train_locally`.
    batchable: ClassVar[bool] = False
    # Whether `server_update` takes the weighted mean of the uploads' deltas with one weight per
    # tensor, and nothing else of them, so that a robust rule (`train.aggregation`) or
    # differential privacy (`train.dp_clip`) may stand in for the mean
    # (floral.engines.aggregation).
    plain_mean: ClassVar[bool] = False
    # Whether the per-part weights are n times a mixture over the parts (FLoRAL's n * pi per
    # adaptor) and the server takes their weighted mean: differential privacy may then stand
    # in for the mean too, clipping the pi-weighted update (`private_upload`).
    mixture_mean: ClassVar[bool] = False
    # Whether `server_update` needs only the element-wise sum of the round's uploads, so that
    # secure aggregation may hand it that sum alone.
    secure_sum: ClassVar[bool] = False
    # Whether the state of the local optimizer (AdamW's moments) for the private tensors a
    # client trains is kept with its private state between its rounds; never uploaded.
    keeps_optimizer_state: ClassVar[bool] = True

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    @classmethod
    def offers(cls) -> frozenset[Capability]:
        """The capabilities this method declares (what aggregation policies may rely on)."""
        declared = {
            Capability.BATCHED: cls.batchable,
            Capability.MEAN_PER_TENSOR: cls.plain_mean,
            Capability.MEAN_PER_PART: cls.mixture_mean,
            Capability.SUM_ONLY: cls.secure_sum,
        }
        return frozenset(c for c, offered in declared.items() if offered)

    # -- the settings ------------------------------------------------------------------------
    def check_against(self, train: TrainConfig, task: TaskConfig) -> None:
        """Checks of the options against the run's other settings, before any work: one-line
        ConfigErrors naming a key, above all for an option that could never take effect (a
        round beyond the last). The options' own ranges (`Options.RANGES`) are checked
        before this; the default checks nothing more."""

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
        names = [name for name in job.private_state if not is_optimizer_key(name)]
        private = slots.snapshot(names)
        private.update(self.kept_optimizer_state(slots, job, names))
        return ClientUpdate(upload, n, private, {"train_loss": train_loss})

    def batch_upload_weights(
        self, model: nn.Module, global_names: Sequence[str], n: int, stacked: TensorDict,
        clients: int,
    ) -> TensorDict | None:
        """`upload_weights` of K clients trained together, each with n examples, from their
        stacked trained tensors (name -> (K, ...)): name -> (K, *weight shape), row k client
        k's. None: no stacked form; `finish_batch` then loads each client's tensors into the
        model and asks `upload_weights`. A method that overrides `upload_weights` overrides
        this too (tests/engines/test_batched.py compares both for every batchable method)."""
        weight = torch.tensor(float(n)).expand(clients)  # one value, K views
        return {name: weight for name in global_names}

    @torch.no_grad()
    def finish_batch(
        self, slots: StateSlots, jobs: Sequence[ClientJob], stacked: TensorDict,
        losses: Sequence[float],
    ) -> list[ClientUpdate]:
        """`finish_step` of clients trained together (floral.engines.batched, equal data
        sizes, SGD): their uploads as rows of one stacked upload (`UploadBatch`), on the CPU,
        from the stacked trained tensors (name -> (K, ...)), with one tensor op per tensor."""
        first, clients = jobs[0], len(jobs)
        n, names = first.data.num_train, list(first.global_state)
        weights = self.batch_upload_weights(slots.model, names, n, stacked, clients)
        if weights is None:
            return self._finish_each(slots, jobs, stacked, losses)
        batch = UploadBatch(tuple(job.client for job in jobs),
                            on_cpu(batch_deltas(stacked, first.global_state, weights)))
        # SGD keeps no optimizer state between rounds (`kept_optimizer_state`).
        private = [name for name in first.private_state if not is_optimizer_key(name)]
        kept = private_rows(stacked, private, clients)
        return [ClientUpdate(batch.rows[i], n, kept[i], {"train_loss": losses[i]}, batch)
                for i in range(clients)]

    def _finish_each(
        self, slots: StateSlots, jobs: Sequence[ClientJob], stacked: TensorDict,
        losses: Sequence[float],
    ) -> list[ClientUpdate]:
        updates = []
        for row, job in enumerate(jobs):
            slots.load({name: value[row] for name, value in stacked.items()})
            updates.append(self.finish_step(slots, job, losses[row]))
        return updates

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

    def check_upload_batch(self, state: ServerState, batch: UploadBatch) -> bool:
        """Whether `check_upload` would find nothing wrong with any row of a stacked upload;
        False sends each row to `check_upload`. It must never say True where `check_upload`
        finds a problem: a method with its own `check_upload` overrides this too."""
        return batch_clear(state.global_state, batch.tensors, len(batch.clients))

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
            crop=job.objective.crop,
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
