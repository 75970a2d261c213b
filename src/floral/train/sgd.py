"""The clients' SGD: torch's SGD update, without importing torch's compiler on first use.

`torch.optim.Optimizer` wraps `add_param_group`, `zero_grad` and `step` so that they import
`torch._dynamo` when first called (to mark them for torch.compile). That import takes about
1.3 CPU-seconds, once per process, and in a federated run it lands inside the first round,
where the first client builds its optimizer. `SGD` here is a `torch.optim.SGD` whose three
methods are plain: the same checks and defaults, and the same update.

The update is the one torch's SGD runs: per parameter, `g = grad (+ weight_decay * p)`, then
with momentum `buf = g` on the first step and `buf = momentum * buf + (1 - dampening) * g`
after it (`g + momentum * buf` with Nesterov, else `buf`), then `p -= lr * g`. It is written
with torch's `_foreach` ops, which on the CPU are torch's per-tensor ops (what torch's SGD runs
there, so the numbers are bit for bit torch's) and on accelerators the multi-tensor kernels
torch's SGD picks by default. The same function steps the batched engine's stacked tensors
(`sgd_step`): the update acts element by element, so each client's row takes its own step.

Only `engine.compile` imports torch's compiler; a plain run never does
(tests/train/test_sgd.py checks both the numbers and the import).
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["SGD", "sgd_step"]


class SGD(torch.optim.SGD):
    """`torch.optim.SGD` (float learning rate and weight decay, not differentiable, not fused)
    whose methods do not import torch's compiler."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's checks and defaults for a new group, undecorated."""
        params = param_group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections")
        params = list(params)
        for param in params:
            if not isinstance(param, Tensor):
                raise TypeError(f"optimizer can only optimize Tensors, got {type(param)}")
            if not (param.is_leaf or param.retains_grad):
                raise ValueError("can't optimize a non-leaf Tensor")
        group = {**param_group, "params": params}
        for name, default in self.defaults.items():
            group.setdefault(name, default)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in seen for p in params):
            raise ValueError("some parameters appear in more than one parameter group")
        self.param_groups.append(group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_()
                    p.grad.requires_grad_(False)
                    p.grad.zero_()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            sgd_step(params, [p.grad for p in params], group, self.state)
        return loss


def sgd_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    group: MutableMapping[str, Any],
    state: MutableMapping[Tensor, dict[str, Any]],
) -> None:
    """One SGD update of `params` in place, with the settings of `group` (lr, momentum,
    dampening, weight_decay, nesterov, maximize); momentum buffers live in `state[p]`."""
    if not params:
        return
    lr, momentum = group["lr"], group["momentum"]
    weight_decay = group["weight_decay"]
    if any(g.is_sparse for g in grads):  # torch's per-tensor path takes sparse gradients
        for p, g in zip(params, grads):
            p.add_(-g if group["maximize"] else g, alpha=-lr)
        return
    steps: list[Tensor] = list(grads)
    if group["maximize"]:
        steps = list(torch._foreach_neg(steps))
    if weight_decay != 0:
        steps = list(torch._foreach_add(steps, list(params), alpha=weight_decay))
    if momentum != 0:
        dampening, nesterov = group["dampening"], group["nesterov"]
        bufs = []
        for p, g in zip(params, steps):
            buf = state[p].get("momentum_buffer") if p in state else None
            if buf is None:
                buf = g.detach().clone()
                state[p]["momentum_buffer"] = buf
            else:
                buf.mul_(momentum).add_(g, alpha=1 - dampening)
            bufs.append(buf)
        steps = list(torch._foreach_add(steps, bufs, alpha=momentum)) if nesterov else bufs
    torch._foreach_add_(list(params), steps, alpha=-lr)
