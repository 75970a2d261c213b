"""Checks on what clients send back, before the server adds it to anything.

A reply that would poison the aggregate is dropped; the round goes on without it. Three layers,
none of which names a method:

1. Values, for every method: floating-point tensors are finite, weights (`name::weight`) are
   floating-point and non-negative.
2. The upload contract of floral.methods.base: for every global tensor `g`, a delta of `g`'s
   shape and dtype and a weight that broadcasts to it, and no other name.
3. A method with its own `server_update` may aggregate uploads that break that contract (a rank
   per client, stacked factors). Such an upload is judged by the method itself: aggregated
   alone, it must be accepted and give finite global tensors of the right shapes and dtypes.

A method can replace all of this with `check_upload(global_state, upload) -> list[str]`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

import torch

from floral.methods.base import WEIGHT_SUFFIX, Method
from floral.train.optim import ServerOptimizer

__all__ = ["check_upload", "method_check", "tensors_digest"]

Tensors = Mapping[str, torch.Tensor]


def method_check(
    method: Method,
    global_state: Tensors,
    upload: Tensors,
    fresh_optimizer: Callable[[], ServerOptimizer],
) -> list[str]:
    """What is wrong with one decoded upload for `method`; empty when it may be aggregated."""
    own = getattr(method, "check_upload", None)
    if own is not None:
        return list(own(global_state, upload))
    problems = _value_problems(upload)
    if problems:
        return problems
    problems = _contract_problems(global_state, upload)
    if problems and type(method).server_update is not Method.server_update:
        return _aggregation_problems(method, global_state, upload, fresh_optimizer())
    return problems


def check_upload(global_state: Tensors, upload: Tensors) -> list[str]:
    """The default rule (values and the upload contract), as short phrases."""
    return _value_problems(upload) or _contract_problems(global_state, upload)


def _value_problems(upload: Tensors) -> list[str]:
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


def _contract_problems(global_state: Tensors, upload: Tensors) -> list[str]:
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
    try:
        broadcast = torch.broadcast_shapes(weight.shape, reference.shape)
    except RuntimeError:
        broadcast = None
    if broadcast != reference.shape:
        return f"has shape {tuple(weight.shape)}, not broadcastable to {tuple(reference.shape)}"
    return None


def _aggregation_problems(
    method: Method, global_state: Tensors, upload: Tensors, optimizer: ServerOptimizer
) -> list[str]:
    try:
        result = method.server_update(global_state, [upload], optimizer)
    except Exception as error:  # noqa: BLE001 - untrusted input meets the method's own checks
        return [f"the method's aggregation refuses it ({type(error).__name__}: {error})"]
    bad = [
        name for name, reference in global_state.items()
        if name not in result
        or result[name].shape != reference.shape
        or result[name].dtype != reference.dtype
        or (reference.is_floating_point() and not bool(result[name].isfinite().all()))
    ]
    return [f"aggregated alone, it gives a bad {name!r}" for name in bad]


def tensors_digest(tensors: Tensors) -> str:
    """SHA-256 of names, dtypes, shapes and bytes: equal digests mean identical tensors."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
