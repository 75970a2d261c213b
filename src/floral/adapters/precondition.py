"""Preconditioned gradients of the low-rank factors, batched over the C adaptors."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

import torch
from torch import Tensor, nn

from floral.adapters.attach import adapted_layers
from floral.adapters.layers import AdaptedLayer

__all__ = ["Preconditioner", "precondition_", "precondition_stacked_"]


class Preconditioner:
    """The backward hook `precondition_(model, eps)`, as an object the batched engine
    recognizes and applies to K clients' stacked gradients at once
    (`precondition_stacked_`)."""

    def __init__(self, model: nn.Module, eps: float = 1e-5) -> None:
        self.model, self.eps = model, eps

    def __call__(self) -> None:
        precondition_(self.model, self.eps)


@torch.no_grad()
def precondition_(model: nn.Module, eps: float = 1e-5) -> None:
    """In place on the gradients of every adapted layer's factors, for each adaptor c:

        g_A <- (B^T B + eps I)^-1 g_A,    g_B <- g_B (A A^T + eps I)^-1,

    with A (r, d_in) and B (d_out, r) the factors as matrices (conv kernels and embedding
    tables flattened to d_in and d_out as in `floral.adapters.layers`). Applies to adapted
    Linear, Conv2d (both forms) and Embedding layers; adaptive biases and norm deltas have no
    factors and keep their gradients. Factors without a gradient are skipped.
    """
    for layer in adapted_layers(model).values():
        factors = layer.adaptor_parameters()
        if "lora_A" not in factors:
            continue
        a, b = factors["lora_A"], factors["lora_B"]
        _precondition_factors(a, b, a.grad, b.grad, eps)


@torch.no_grad()
def precondition_stacked_(
    model: nn.Module, tensors: Mapping[str, Tensor], grads: MutableMapping[str, Tensor],
    clients: int, eps: float = 1e-5, layers: Mapping[str, AdaptedLayer] | None = None,
) -> None:
    """`precondition_` for K clients at once, in place on their stacked gradients: `tensors`
    and `grads` map a model tensor's name to its (K, ...) values and gradients; a factor
    not in `tensors` is the model's own, the same for every client. `layers`: the model's
    `adapted_layers`, where the caller found them once for many steps."""
    for prefix, layer in (adapted_layers(model) if layers is None else layers).items():
        factors = layer.adaptor_parameters()
        if "lora_A" not in factors:
            continue
        names = {f: f"{prefix}.{f}" if prefix else f for f in ("lora_A", "lora_B")}
        a, b = (tensors.get(names[f], factors[f].expand(clients, *factors[f].shape))
                for f in ("lora_A", "lora_B"))
        if a.shape[2] == 1:  # rank 1: K * C divisions, no copies (as `_solve_into` divides)
            _divide_rank_one(a, b, grads.get(names["lora_A"]), grads.get(names["lora_B"]), eps)
            continue
        # A batched product's gradient may be a transposed view: solved in a contiguous copy.
        for f in ("lora_A", "lora_B"):
            if names[f] in grads:
                grads[names[f]] = grads[names[f]].contiguous()
        grad_a, grad_b = (grads.get(names[f]) for f in ("lora_A", "lora_B"))
        # As in `precondition_`, with the K clients' C adaptors as K * C systems.
        _precondition_factors(a.flatten(0, 1), b.flatten(0, 1),
                              None if grad_a is None else grad_a.flatten(0, 1),
                              None if grad_b is None else grad_b.flatten(0, 1), eps)


def _precondition_factors(
    a: Tensor, b: Tensor, grad_a: Tensor | None, grad_b: Tensor | None, eps: float
) -> None:
    """In place on the gradients of N adaptors' factors a (N, r, ...) and b (N, r, ...)."""
    count, rank = a.shape[:2]
    # B is stored transposed, (C, r, d_out): B^T B is then b b^T, and g_B (A A^T)^-1
    # transposed is (A A^T)^-1 g_B^T since A A^T is symmetric.
    a_flat, b_flat = a.reshape(count, rank, -1), b.reshape(count, rank, -1)
    ridge = eps * torch.eye(rank, dtype=a.dtype, device=a.device)
    if grad_a is not None:
        _solve_into(grad_a, b_flat @ b_flat.mT + ridge)
    if grad_b is not None:
        _solve_into(grad_b, a_flat @ a_flat.mT + ridge)


def _divide_rank_one(a: Tensor, b: Tensor, grad_a: Tensor | None, grad_b: Tensor | None,
                     eps: float) -> None:
    """`_precondition_factors` of K clients' rank-1 factors (K, C, 1, ...), in place: each
    gradient over its 1x1 Gram matrix plus eps, the same products as one client's."""
    for grad, other in ((grad_a, b), (grad_b, a)):
        if grad is not None:
            flat = other.flatten(3)  # (K, C, 1, d)
            gram = torch.matmul(flat, flat.mT).add_(eps)  # (K, C, 1, 1)
            grad.div_(gram.reshape(gram.shape[:2] + (1,) * (grad.dim() - 2)))


def _solve_into(grad: Tensor, gram: Tensor) -> None:
    count, rank = gram.shape[:2]
    if rank == 1:  # a 1x1 system per adaptor: a division, without the solver's overhead
        grad.div_(gram.reshape((count,) + (1,) * (grad.dim() - 1)))
        return
    solved = torch.linalg.solve(gram, grad.reshape(count, rank, -1))
    grad.copy_(solved.view_as(grad))
