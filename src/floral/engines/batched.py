"""Batched client execution: the clients of a round that hold equally many training examples
train together, as one computation over their tensors stacked on a leading client axis.

Opt in with `[engine] batch_clients = N` (at most N clients per batch; 0, the default, is off).
For one batch of K clients:

- every global and private tensor is stacked to (K, ...), one row per client;
- one SGD step runs, where the model allows, as tensor ops over the stacked clients
  (`floral.adapters.stacked`): the K minibatches as K * b client-major rows through the
  model's own forward, with nn.Linear and the fused mixture of AdaptedLinear as batched
  products (`bmm`) over the stacked weights and factors and the routers' pi drawn for all K
  clients at once; per-client losses, their gradients by one autograd call, FLoRAL's
  preconditioning on the stacked gradients (`precondition_stacked_`). Models with other
  layers (convolutions, norms, embeddings) fall back to `torch.func.vmap` over (tensors,
  batch x, batch y) of `functional_call`, and a backward hook other than the preconditioner
  runs under a second vmap with the model's tensors and their `.grad` swapped for the
  client's row, so a hook written for one model applies per client unchanged;
- each client's minibatches come from its own generator through `epoch_batches`, exactly as in
  `train_epochs`, so every client sees the batches it sees in the sequential engine;
- floral's SGD update (`floral.train.sgd.sgd_step`, torch's SGD update), with the method's
  parameter groups (lr, momentum, weight decay, ...), steps the stacked tensors: SGD acts
  element by element, so this is each client's own SGD;
- then the method's `finish_batch` builds the uploads and private states of all K clients from
  the stacked tensors at once (each upload a row of one stacked upload, which the server checks
  at once), as `finish_step` does for one client in `client_step`.

Clients it does not train are left to the engine's sequential step: all of them when the method
declares that it is not `batchable` (it replaces the default client step or training loop), its
optimizer is not SGD, the step accumulates or clips gradients, runs in mixed precision or
compiled, or the model keeps running statistics (BatchNorm) or ties tensors; a
batch whose first vmapped step fails (an operation without a batching rule, a hook that reads a
tensor into Python) and, from then on, every batch.

Numbers: batched matmuls add up in another order than one client's, so results match the
sequential engine to float32 rounding, not bit for bit. Router noise on the tensor step comes
from one generator per client, seeded as its sequential step seeds torch's: each client draws
the noise it draws alone. Other random draws (dropout; everything on the vmap fallback, with
randomness="different") come from torch's generator seeded with the batch's first client:
batched runs are repeatable, but draw other dropout masks than sequential ones.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import cast

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from floral.adapters.attach import adapted_layers
from floral.adapters.precondition import Preconditioner, precondition_stacked_
from floral.adapters.stacked import client_losses, stacked_forward
from floral.engines.config import BatchClients
from floral.methods.base import ClientJob, ClientUpdate, Method
from floral.train.device import seeded_rng
from floral.train.loop import TrainConfig, epoch_batches
from floral.train.sgd import SGD, sgd_step
from floral.train.state import StateSlots, TensorDict

__all__ = ["batchable", "batched_client_steps", "plan_batches"]

# Buffers that a forward in training mode rewrites (BatchNorm, InstanceNorm with tracking).
_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")

StepFn = Callable[[TensorDict, Tensor, Tensor], tuple[TensorDict, Tensor]]


def batched_client_steps(
    method: Method, slots: StateSlots, jobs: Sequence[ClientJob], batch_clients: BatchClients
) -> dict[int, ClientUpdate]:
    """Updates of the clients trained in batches (all jobs share one global state); the caller
    runs the others one by one. `batch_clients`: "auto" (all, where the tensor step covers the
    model), at most N per batch (vmap for other layers), or 0 (none)."""
    # What the model's structure decides is found once per scratch model, not every round.
    if not batch_clients or not slots.memo(("batchable", id(method)),
                                           lambda: batchable(method, slots.model)):
        return {}
    auto = batch_clients == "auto"
    updates: dict[int, ClientUpdate] = {}
    for batch in plan_batches(jobs, len(jobs) if auto else int(batch_clients)):
        if len(batch) < 2 or batch[0].data.num_train == 0 or _disabled(slots, method):
            continue  # one client gains nothing from vmap; no examples means no steps
        done = _train_batch(method, slots, batch, vmap=not auto)
        if done is None:
            slots.memo(("batched-off", id(method)), dict)["off"] = True
            continue
        updates.update(done)
    return updates


def batchable(method: Method, model: nn.Module) -> bool:
    """Whether the method declares it trains with the default client step, and the model can
    be stacked."""
    if not method.batchable:
        return False
    if any(name.rpartition(".")[2] in _RUNNING_STATS for name, _ in model.named_buffers()):
        return False
    # Tied tensors would come apart once stacked separately.
    state = model.state_dict(keep_vars=True)
    return len({id(t) for t in state.values()}) == len(state)


def plan_batches(jobs: Sequence[ClientJob], limit: int) -> list[list[ClientJob]]:
    """Jobs grouped by number of training examples, each group cut into near-equal batches of
    at most `limit` (equal sizes mean equal step counts and batch shapes)."""
    by_size: dict[int, list[ClientJob]] = {}
    for job in jobs:
        by_size.setdefault(job.data.num_train, []).append(job)
    batches = []
    for same in by_size.values():
        size = -(-len(same) // -(-len(same) // limit))  # spread evenly over the fewest batches
        batches += [same[i : i + size] for i in range(0, len(same), size)]
    return batches


def _disabled(slots: StateSlots, method: Method) -> bool:
    return slots.memo(("batched-off", id(method)), dict).get("off", False)


def _train_batch(
    method: Method, slots: StateSlots, batch: Sequence[ClientJob], vmap: bool
) -> dict[int, ClientUpdate] | None:
    """Train one batch of clients; None when it cannot run batched (or only through the vmap
    fallback, and `vmap` is False)."""
    first = batch[0]
    if not _plain_step(first):
        return None
    if not slots.model.training:  # as `train_epochs`: router noise and dropout are on
        slots.model.train()
    optimizer = method.local_optimizer(slots, first)
    private_names = list(first.private_state)
    if type(optimizer) not in (SGD, torch.optim.SGD) or any(
        list(job.private_state) != private_names for job in batch
    ):
        return None
    stacked = _stack(slots, first.global_state, batch)
    groups = _stacked_groups(optimizer, slots, stacked)
    if groups is None:
        return None
    trained = [name for group in groups for name in group["names"]]
    for name in trained:
        stacked[name].requires_grad_(True)
    hook = method.backward_hook(slots.model)
    with ExitStack() as bound:  # the stacked tensors stay in the model for the whole batch
        step = _tensor_step(slots, first.objective.loss, trained, hook, stacked, batch, bound)
        if step is None:
            if not vmap:  # vmap can cost K times the memory of a step: only when asked for
                return None
            step = _vmapped_step(slots.model, first.objective.loss, trained, hook)
        losses = _run_epochs(step, stacked, groups, batch, first.config)
    if losses is None:
        return None
    finished = method.finish_batch(slots, batch, stacked, losses.tolist())
    return {job.client: update for job, update in zip(batch, finished)}


def _plain_step(job: ClientJob) -> bool:
    """Whether the job's step is the one this module reproduces: one full-precision, eager
    optimizer step per minibatch, unclipped."""
    config, placement = job.config, job.placement
    return (config.grad_accumulation == 1 and config.max_grad_norm == 0
            and not placement.mixed and not placement.compile)


@torch.no_grad()
def _stack(
    slots: StateSlots, global_state: Mapping[str, Tensor], batch: Sequence[ClientJob]
) -> TensorDict:
    """Every tensor a client step loads, as (K, ...) in the scratch model's dtype and device."""
    stacked: TensorDict = {}
    for name, value in global_state.items():
        value = value.to(slots.tensors[name])
        stacked[name] = value.expand(len(batch), *value.shape).clone()
    for name in batch[0].private_state:
        stacked[name] = torch.stack(
            [job.private_state[name].to(slots.tensors[name]) for job in batch]
        )
    return stacked


def _stacked_groups(
    optimizer: torch.optim.Optimizer, slots: StateSlots, stacked: TensorDict
) -> list[dict] | None:
    """The method's SGD groups with the stacked tensors in place of the model's parameters;
    None when it trains a tensor that is neither global nor private (no row to stack)."""
    name_of = {id(t): name for name, t in slots.tensors.items()}
    groups = []
    for group in optimizer.param_groups:
        names = [name_of.get(id(p)) for p in group["params"]]
        known = [name for name in names if name is not None and name in stacked]
        if len(known) < len(names):
            return None
        settings = {k: v for k, v in group.items() if k != "params"}
        groups.append({**settings, "params": [stacked[n] for n in known], "names": known})
    return groups


def _tensor_step(
    slots: StateSlots,
    loss_fn: Callable,
    trained: Sequence[str],
    hook: Callable[[], None] | None,
    stacked: TensorDict,
    batch: Sequence[ClientJob],
    bound: ExitStack,
) -> StepFn | None:
    """The step as tensor ops over the stacked clients (`floral.adapters.stacked`): one
    forward of the K minibatches as K * b client-major rows, autograd, and FLoRAL's
    preconditioning on the stacked gradients; a backward hook of another kind runs per client
    under vmap. The stacked tensors are swapped into the model until `bound` closes (the steps
    update them in place). None when the model has a layer the stacked forward does not
    cover."""
    model = slots.model
    stacked_model, layers = slots.memo(("stacked-forward", tuple(stacked)), lambda: (
        stacked_forward(model, stacked.keys()), adapted_layers(model)))
    if stacked_model is None:
        return None
    clients, device = len(batch), batch[0].placement.device
    forward = bound.enter_context(stacked_model.bound(stacked, clients))
    # Router noise per client, from a generator seeded as its own step seeds torch's
    # (`local_epochs`): the draws it makes when it trains alone.
    generators = [torch.Generator(device).manual_seed(job.seed) for job in batch]
    run_hook = None
    if hook is not None and not isinstance(hook, Preconditioner):
        tables = _tables(model, trained)
        run_hook = vmap(
            lambda tensors, grads: _after_backward(tables, tensors, grads, hook),
            randomness="different",
        )

    def step(values: TensorDict, x: Tensor, y: Tensor) -> tuple[TensorDict, Tensor]:
        out = forward(x.flatten(0, 1), generators)  # over `stacked`, which `values` is
        losses = client_losses(loss_fn, out, y.flatten(0, 1), clients)
        leaves = [values[name] for name in trained]
        found = torch.autograd.grad(losses.sum(), leaves, allow_unused=True)
        # A tensor the loss does not use keeps no gradient, as in the sequential step.
        grads = {name: g for name, g in zip(trained, found) if g is not None}
        if isinstance(hook, Preconditioner):
            precondition_stacked_(model, values, grads, clients, hook.eps, layers)
        elif run_hook is not None:
            grads = run_hook({name: value.detach() for name, value in values.items()}, grads)
        return grads, losses.detach()

    return step


def _vmapped_step(
    model: nn.Module, loss_fn: Callable, trained: Sequence[str], hook: Callable[[], None] | None
) -> StepFn:
    """(stacked tensors, x (K, b, ...), y (K, b, ...)) -> (gradients (K, ...), losses (K,)).

    Plain autograd through a vmapped forward: client k's loss depends on its row only, so the
    gradient of the summed losses is, row by row, each client's own gradient (and it costs
    half of vmap over torch.func.grad on small models).
    """
    losses_of = vmap(
        lambda tensors, x, y: loss_fn(functional_call(model, tensors, (x,)), y),
        randomness="different",
    )
    tables = _tables(model, trained)
    run_hook = None if hook is None else vmap(
        lambda tensors, grads: _after_backward(tables, tensors, grads, hook),
        randomness="different",
    )

    def step(stacked: TensorDict, x: Tensor, y: Tensor) -> tuple[TensorDict, Tensor]:
        losses = losses_of(stacked, x, y)
        leaves = [stacked[name] for name in trained]
        found = torch.autograd.grad(losses.sum(), leaves, allow_unused=True)
        # A tensor the loss does not use keeps no gradient, as in the sequential step.
        grads = {name: g for name, g in zip(trained, found) if g is not None}
        if run_hook is not None:
            values = {name: value.detach() for name, value in stacked.items()}
            grads = run_hook(values, grads)
        return grads, losses.detach()

    return step


def _tables(model: nn.Module, names: Sequence[str]) -> list[tuple[str, dict, str]]:
    """(name, the owning module's parameter dict, attribute) of each trained tensor."""
    tables = []
    for name in names:
        module_name, _, attr = name.rpartition(".")
        tables.append((name, model.get_submodule(module_name)._parameters, attr))
    return tables


def _after_backward(
    tables: Sequence[tuple[str, dict, str]],
    tensors: TensorDict,
    grads: TensorDict,
    hook: Callable[[], None],
) -> TensorDict:
    """Run the hook on one client's view: its tensors in the model, its gradients as `.grad`."""
    with _swapped(tables, tensors):
        for name, grad in grads.items():
            tensors[name].grad = grad
        try:
            hook()
            # Read back, not reuse: a hook may assign a new `.grad` instead of editing in place.
            # Never None: vmap returns only tensors.
            grads = {name: cast(Tensor, tensors[name].grad) for name in grads}
        finally:
            for name in grads:
                tensors[name].grad = None
    return grads


@contextmanager
def _swapped(tables: Sequence[tuple[str, dict, str]], tensors: TensorDict) -> Iterator[None]:
    saved = [(table, attr, table[attr]) for _, table, attr in tables]
    for name, table, attr in tables:
        table[attr] = tensors[name]
    try:
        yield
    finally:
        for table, attr, value in saved:
            table[attr] = value


def _run_epochs(
    step: StepFn,
    stacked: TensorDict,
    groups: Sequence[dict],
    batch: Sequence[ClientJob],
    config: TrainConfig,
) -> Tensor | None:
    """The local epochs of every client in the batch; mean loss per client (K,), or None when
    the first step cannot run batched."""
    x = torch.stack([job.data.x_train for job in batch])
    y = torch.stack([job.data.y_train for job in batch])
    rows = torch.arange(len(batch)).unsqueeze(1)
    device = batch[0].placement.device
    state: dict[Tensor, dict] = defaultdict(dict)  # momentum buffers of the stacked tensors
    losses: list[Tensor] = []
    with seeded_rng(batch[0].seed, device), torch.no_grad():
        for index in _batch_indices(batch, config):
            try:
                with torch.enable_grad():
                    grads, loss = step(stacked, x[rows, index].to(device),
                                       y[rows, index].to(device))
            except Exception:
                # The first step is the probe: an op without a batching rule, a hook that reads
                # values into Python. The sequential step then runs these clients and raises
                # any real error there. Later failures are real errors.
                if losses:
                    raise
                return None
            for group in groups:
                # A tensor without a gradient is skipped, as torch's SGD skips it.
                names = [name for name in group["names"] if name in grads]
                sgd_step([stacked[n] for n in names], [grads[n] for n in names], group, state)
            losses.append(loss)
    return torch.stack(losses).mean(0)


def _batch_indices(batch: Sequence[ClientJob], config: TrainConfig) -> Iterator[Tensor]:
    """(K, b) example indices per step: each client's own order, drawn as `train_epochs` does."""
    generators = [torch.Generator().manual_seed(job.seed) for job in batch]
    n = batch[0].data.num_train
    for _ in range(config.local_epochs):
        per_client = [epoch_batches(n, config.batch_size, g) for g in generators]
        for pieces in zip(*per_client):
            yield torch.stack(pieces)
