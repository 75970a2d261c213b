"""The rank of a layer's adaptors, from an integer or a fraction of the layer."""

from __future__ import annotations

import math

from floral.adapters.spec import check_rank
from floral.errors import ConfigError

__all__ = ["resolve_rank"]

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
