"""The rank of a layer's adaptors, from an integer or a fraction of the layer."""

from __future__ import annotations

import math

import torch

from floral.adapters.spec import check_rank
from floral.errors import ConfigError

__all__ = ["resolve_rank", "truncate_rank"]

# Products like 0.1 * 20 * 20 / 40 land a hair below the integer in binary floating point;
# without this slack a layer would silently lose one rank.
_FLOOR_SLACK = 1e-9


def resolve_rank(rank: int | float, d_in: int, d_out: int, min_rank: int = 1) -> int:
    """Rank r of one adaptor of a layer whose factors are A (r, d_in) and B (d_out, r).

    An integer `rank` is taken as is. A float rho in (0, 1] gives
    r = max(min_rank, floor(rho * d_in * d_out / (d_in + d_out))), i.e. the adaptor's
    r * (d_in + d_out) parameters are about a fraction rho of the d_in * d_out of a full matrix.
    What d_in and d_out are for each layer type is documented in `floral.adapters.layers`.
    """
    check_rank(rank)
    if not isinstance(min_rank, int) or min_rank < 1:
        raise ConfigError(f"min_rank = {min_rank!r}: must be an integer >= 1")
    if d_in < 1 or d_out < 1:
        raise ConfigError(f"layer size d_in={d_in}, d_out={d_out}: both must be >= 1")
    if isinstance(rank, int):
        return rank
    fraction_rank = math.floor(rank * d_in * d_out / (d_in + d_out) + _FLOOR_SLACK)
    return max(min_rank, fraction_rank)


@torch.no_grad()
def truncate_rank(
    lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each adaptor's product B_c^T A_c cut to its best rank-`rank` approximation (Eckart-Young),
    in factors of the same shapes (C, R, d_in) and (C, R, d_out) whose rows from `rank` on are
    zero.

    Zero rows in both factors stay zero under gradient descent (each one's gradient is the
    other's), so a model truncated once keeps `rank` ranks for the rest of training.
    """
    if lora_a.dim() != 3 or lora_b.dim() != 3 or lora_a.shape[:2] != lora_b.shape[:2]:
        raise ValueError(f"factors of shapes {tuple(lora_a.shape)}, {tuple(lora_b.shape)}")
    u, s, vh = torch.linalg.svd(lora_b.transpose(1, 2) @ lora_a, full_matrices=False)
    keep = min(rank, s.shape[-1])  # the product's rank is at most min(R, d_in, d_out)
    root = s[:, :keep].sqrt()
    new_a, new_b = torch.zeros_like(lora_a), torch.zeros_like(lora_b)
    new_a[:, :keep] = root[..., None] * vh[:, :keep]
    new_b[:, :keep] = (u[:, :, :keep] * root[:, None, :]).transpose(1, 2)
    return new_a, new_b
