"""The rank of a layer's adaptors, from an integer or a fraction of the layer."""

from __future__ import annotations

import logging
import math

from floral.adapters.spec import check_rank
from floral.errors import ConfigError

__all__ = ["excess_rank", "resolve_rank"]

log = logging.getLogger("floral")

# Products like 0.1 * 20 * 20 / 40 land a hair below the integer in binary floating point;
# without this slack a layer would silently lose one rank.
_FLOOR_SLACK = 1e-9


def resolve_rank(
    rank: int | float, d_in: int, d_out: int, min_rank: int = 1, layer: str | None = None
) -> int:
    """Rank r of one adaptor of a layer whose factors are A (r, d_in) and B (d_out, r).

    An integer `rank` is taken as is. A float rho in (0, 1] gives
    r = max(min_rank, floor(rho * d_in * d_out / (d_in + d_out))), i.e. the adaptor's
    r * (d_in + d_out) parameters are about a fraction rho of the d_in * d_out of a full matrix.
    What d_in and d_out are for each layer type is documented in `floral.adapters.layers`.

    B A has rank at most min(d_in, d_out): ranks above it (an integer `rank`, or a `min_rank`
    that lifts a fraction) only add parameters, and bytes on the wire, that change nothing.
    They are kept (the adaptor is built as asked) and logged as a warning on the "floral"
    logger, naming `layer` (the module's qualified name) when given. A fraction alone never
    exceeds the limit.
    """
    check_rank(rank)
    if not isinstance(min_rank, int) or min_rank < 1:
        raise ConfigError(f"min_rank = {min_rank!r}: must be an integer >= 1")
    if d_in < 1 or d_out < 1:
        raise ConfigError(f"layer size d_in={d_in}, d_out={d_out}: both must be >= 1")
    if isinstance(rank, int):
        resolved, key = rank, "rank"
    else:
        fraction_rank = math.floor(rank * d_in * d_out / (d_in + d_out) + _FLOOR_SLACK)
        resolved, key = max(min_rank, fraction_rank), "min_rank"
    problem = excess_rank(key, resolved, d_in, d_out, layer)
    if problem is not None:
        log.warning("%s", problem)
    return resolved


def excess_rank(key: str, rank: int, d_in: int, d_out: int, layer: str | None) -> str | None:
    """`rank = 64 is more than layer 'fc2' allows (min(d_in, d_out) = min(200, 10) = 10): 54 of
    its ranks only add parameters`, or None when `rank` fits the layer. The phrase starts
    `key = value`, as `check_rank`'s errors do, so a caller may prefix the setting's table."""
    limit = min(d_in, d_out)
    if rank <= limit:
        return None
    where = f"layer {layer!r}" if layer is not None else "a layer"
    excess = rank - limit
    return (
        f"{key} = {rank} is more than {where} allows (min(d_in, d_out) = min({d_in}, {d_out}) "
        f"= {limit}): {excess} of its ranks only add{'s' if excess == 1 else ''} parameters"
    )
