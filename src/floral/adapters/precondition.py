"""Preconditioned gradients of the low-rank factors, batched over the C adaptors."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from floral.adapters.attach import adapted_layers

__all__ = ["precondition_"]


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
        count, rank = a.shape[:2]
        # B is stored transposed, (C, r, d_out): B^T B is then b b^T, and g_B (A A^T)^-1
        # transposed is (A A^T)^-1 g_B^T since A A^T is symmetric.
        a_flat, b_flat = a.reshape(count, rank, -1), b.reshape(count, rank, -1)
        ridge = eps * torch.eye(rank, dtype=a.dtype, device=a.device)
        if a.grad is not None:
            _solve_into(a.grad, b_flat @ b_flat.mT + ridge)
        if b.grad is not None:
            _solve_into(b.grad, a_flat @ a_flat.mT + ridge)


def _solve_into(grad: Tensor, gram: Tensor) -> None:
    count, rank = gram.shape[:2]
    if rank == 1:  # a 1x1 system per adaptor: a division, without the solver's overhead
        grad.div_(gram.reshape((count,) + (1,) * (grad.dim() - 1)))
        return
    solved = torch.linalg.solve(gram, grad.reshape(count, rank, -1))
    grad.copy_(solved.view_as(grad))
