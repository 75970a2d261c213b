"""Checks on one upload before the server adds it to anything (`Method.check_upload`).

An upload that would poison the aggregate is dropped by the engine, and the round goes on
without it. These are the default rules; none of them names a method.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from floral.train.optim import ServerOptimizer
from floral.train.state import WEIGHT_SUFFIX

if TYPE_CHECKING:
    from floral.methods.base import Method, ServerState

__all__ = [
    "aggregation_problems",
    "all_finite",
    "batch_clear",
    "contract_problems",
    "value_problems",
]

Tensors = Mapping[str, torch.Tensor]


def value_problems(upload: Tensors) -> list[str]:
    """Floating-point tensors are finite; weights (`name::weight`) are floating-point and
    non-negative."""
    if _all_clear(upload):
        return []
    problems = []
    for name, tensor in upload.items():
        is_weight = name.endswith(WEIGHT_SUFFIX)
        if is_weight and not tensor.is_floating_point():
            problems.append(f"{name!r} has dtype {tensor.dtype}, expected a floating-point weight")
        elif tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            problems.append(f"{name!r} has NaN or infinite values")
        elif is_weight and bool((tensor < 0).any()):
            problems.append(f"{name!r} has negative weights")
    return problems


def _all_clear(upload: Tensors) -> bool:
    """Whether a few bulk reductions show that every value rule holds; False sends the upload
    to the exact test, tensor by tensor. A sum of finite values may overflow, so False is
    only a suspicion; True is certain (NaN and infinity always reach a sum)."""
    floats = [t for t in upload.values() if t.is_floating_point()]
    weights = [t.reshape(-1) for n, t in upload.items() if n.endswith(WEIGHT_SUFFIX)]
    if any(not w.is_floating_point() for w in weights):
        return False
    if not _sums_finite(floats):
        return False
    if weights:
        every_weight = torch.cat(weights)
        if every_weight.numel() and bool(every_weight.min() < 0):
            return False
    return True


def all_finite(tensors: Tensors) -> bool:
    """Whether no floating-point tensor holds NaN or infinity: one sum per tensor, and the
    exact test only where a sum is not finite (a sum of finite values may overflow)."""
    floats = [t for t in tensors.values() if t.is_floating_point()]
    return _sums_finite(floats) or all(bool(t.isfinite().all()) for t in floats)


def _sums_finite(floats: list[torch.Tensor]) -> bool:
    """Whether every tensor's sum is finite (then none holds NaN or infinity)."""
    if not floats:
        return True
    return bool(torch.stack([t.sum(dtype=torch.float32) for t in floats]).isfinite().all())


def contract_problems(global_state: Tensors, upload: Tensors) -> list[str]:
    """For every global tensor `g`, a delta of `g`'s shape and dtype and a weight that
    broadcasts to it, and no other name."""
    expected = [n for name in global_state for n in (name, name + WEIGHT_SUFFIX)]
    problems = [f"missing {name!r}" for name in expected if name not in upload]
    for name, tensor in upload.items():
        base = name.removesuffix(WEIGHT_SUFFIX)
        reference = global_state.get(base)
        if reference is None:
            problems.append(f"unexpected {name!r}")
            continue
        check = _weight_problem if base != name else _delta_problem
        problem = check(tensor, reference)
        if problem is not None:
            problems.append(f"{name!r} {problem}")
    return problems


def _delta_problem(tensor: torch.Tensor, reference: torch.Tensor) -> str | None:
    if tensor.shape != reference.shape:
        return f"has shape {tuple(tensor.shape)}, expected {tuple(reference.shape)}"
    if tensor.dtype != reference.dtype:
        return f"has dtype {tensor.dtype}, expected {reference.dtype}"
    return None


def _weight_problem(weight: torch.Tensor, reference: torch.Tensor) -> str | None:
    shape, target = tuple(weight.shape), tuple(reference.shape)
    # Broadcasting to exactly `target`: each trailing axis of the weight is 1 or target's.
    fits = len(shape) <= len(target) and all(
        size in (1, want) for size, want in zip(reversed(shape), reversed(target))
    )
    if not fits:
        return f"has shape {shape}, not broadcastable to {target}"
    return None


def aggregation_problems(method: Method, state: ServerState, upload: Tensors) -> list[str]:
    """For uploads outside the default contract (a rank per client, stacked factors): the
    method's own aggregation, of this upload alone (with a fresh plain server optimizer), must
    accept it and give finite global tensors of the global shapes and dtypes."""
    try:
        result = method.server_update(state, [upload], ServerOptimizer()).global_state
    except Exception as error:  # noqa: BLE001 - untrusted input meets the method's own checks
        return [f"the method's aggregation refuses it ({type(error).__name__}: {error})"]
    bad = [
        name for name, reference in state.global_state.items()
        if name not in result
        or result[name].shape != reference.shape
        or result[name].dtype != reference.dtype
        or (reference.is_floating_point() and not bool(result[name].isfinite().all()))
    ]
    return [f"aggregated alone, it gives a bad {name!r}" for name in bad]


def batch_clear(global_state: Tensors, stacked: Tensors, clients: int) -> bool:
    """Whether every row of a stacked upload (`floral.methods.upload_batch`: name -> (K, ...))
    passes `value_problems` and `contract_problems`, from one reduction per stacked tensor.
    True is certain; False only says that some row needs the exact, per-upload check (which
    then names what is wrong with it)."""
    expected = [n for name in global_state for n in (name, name + WEIGHT_SUFFIX)]
    if len(stacked) != len(expected) or any(name not in stacked for name in expected):
        return False
    for name, tensor in stacked.items():
        base = name.removesuffix(WEIGHT_SUFFIX)
        check = _weight_problem if base != name else _delta_problem
        if tensor.dim() == 0 or tensor.shape[0] != clients:
            return False
        if check(tensor[0], global_state[base]) is not None:  # one row's shape is every row's
            return False
    return _all_clear(stacked)
