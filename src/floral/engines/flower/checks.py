"""Checks on what clients send back, before the server adds it to anything.

A reply that would poison the aggregate (a tensor of the wrong shape or dtype, NaN or inf, a
missing or unexpected name, a negative weight) is dropped; the round goes on without it.

The default rule follows the method contract (floral.methods.base): for every global tensor
`g` the upload holds a delta of `g`'s shape and dtype and a non-negative weight `g::weight`
that broadcasts to it, and nothing else. A method whose uploads legitimately differ (a rank per
client, stacked factors) defines `check_upload(global_state, upload) -> list[str]` itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

from floral.methods.base import WEIGHT_SUFFIX, Method

__all__ = ["check_upload", "method_check", "tensors_digest"]


def method_check(
    method: Method, global_state: Mapping[str, torch.Tensor], upload: Mapping[str, torch.Tensor]
) -> list[str]:
    """The method's own `check_upload` if it has one, else the contract's default rule."""
    own = getattr(method, "check_upload", None)
    if own is not None:
        return list(own(global_state, upload))
    return check_upload(global_state, upload)


def check_upload(
    global_state: Mapping[str, torch.Tensor], upload: Mapping[str, torch.Tensor]
) -> list[str]:
    """What is wrong with one decoded upload, as short phrases; empty when it is well-formed."""
    problems = [f"missing {name!r}" for name in _expected_names(global_state) if name not in upload]
    for name, tensor in upload.items():
        base = name[: -len(WEIGHT_SUFFIX)] if name.endswith(WEIGHT_SUFFIX) else name
        reference = global_state.get(base)
        if reference is None:
            problems.append(f"unexpected {name!r}")
            continue
        problem = (
            _weight_problem(tensor, reference) if base != name else _delta_problem(tensor, reference)
        )
        if problem is None and tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            problem = "has NaN or infinite values"
        if problem is not None:
            problems.append(f"{name!r} {problem}")
    return problems


def _expected_names(global_state: Mapping[str, torch.Tensor]) -> list[str]:
    return [n for name in global_state for n in (name, name + WEIGHT_SUFFIX)]


def _delta_problem(tensor: torch.Tensor, reference: torch.Tensor) -> str | None:
    if tensor.shape != reference.shape:
        return f"has shape {tuple(tensor.shape)}, expected {tuple(reference.shape)}"
    if tensor.dtype != reference.dtype:
        return f"has dtype {tensor.dtype}, expected {reference.dtype}"
    return None


def _weight_problem(weight: torch.Tensor, reference: torch.Tensor) -> str | None:
    if not weight.is_floating_point():
        return f"has dtype {weight.dtype}, expected a floating-point weight"
    try:
        broadcast = torch.broadcast_shapes(weight.shape, reference.shape)
    except RuntimeError:
        broadcast = None
    if broadcast != reference.shape:
        return f"has shape {tuple(weight.shape)}, which does not broadcast to {tuple(reference.shape)}"
    if bool((weight < 0).any()):
        return "has negative weights"
    return None


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of names, dtypes, shapes and bytes: equal digests mean identical tensors."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
