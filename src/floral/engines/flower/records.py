"""Named tensors <-> Flower records, and the names of the records floral's messages carry.

Tensors travel as `ArrayRecord`s of NumPy-serialized `Array`s (never pickled). NumPy has no
bfloat16, so such tensors travel as their raw little-endian bytes under a stype of our own.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message

from floral.methods.base import ServerState
from floral.train.state import TensorDict, aligned

__all__ = [
    "CONFIG",
    "EVAL",
    "GENERATION_PREFIX",
    "GLOBAL",
    "INITIAL",
    "INITIAL_STATE",
    "METRICS",
    "NODE",
    "PRIVATE",
    "UPLOAD",
    "error_reason",
    "from_record",
    "initial_digest",
    "tensors_digest",
    "to_record",
]

# Record names inside a message's content (and the node's `context.state`).
CONFIG = "floral.config"  # server -> client: the experiment (TOML) and the round
GLOBAL = "floral.global"  # server -> client: the global tensors (encoded on train rounds)
NODE = "floral.node"  # client -> server, on query: partition, cluster, task kind, digest
INITIAL = "floral.initial"  # client -> server, on request: the initial global tensors
INITIAL_STATE = "floral.initial-state"  # ... and the method's initial server state
UPLOAD = "floral.upload"  # client -> server: the encoded upload
METRICS = "floral.metrics"  # client -> server: train loss and number of examples
EVAL = "floral.eval"  # client -> server: test sums (loss, score, count)
PRIVATE = "floral.private"  # context.state only: the client's private tensors, never sent
# Keys of EVAL that carry summable statistics of generated text (chrF n-grams, exact matches).
GENERATION_PREFIX = "generation."

_RAW_STYPE = "floral.raw-le"
_RAW_DTYPES = {"bfloat16": torch.bfloat16}


def to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    record = ArrayRecord()
    for name, tensor in tensors.items():
        record[name] = _to_array(tensor)
    return record


def from_record(record: ArrayRecord) -> TensorDict:
    """Tensors from a record; a malformed array raises ValueError naming it."""
    tensors: TensorDict = {}
    for name in record:
        try:
            tensors[name] = _from_array(record[name])
        except (ValueError, TypeError, RuntimeError) as error:
            raise ValueError(f"array {name!r} cannot be read ({error})") from None
    return aligned(tensors)


def _to_array(tensor: torch.Tensor) -> Array:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        raw = tensor.reshape(-1).view(torch.int16).numpy().astype("<i2").tobytes()
        return Array(dtype="bfloat16", shape=tuple(tensor.shape), stype=_RAW_STYPE, data=raw)
    return Array(tensor.numpy())


def _from_array(array: Array) -> torch.Tensor:
    if array.stype == _RAW_STYPE:
        dtype = _RAW_DTYPES.get(array.dtype)
        if dtype is None:
            raise ValueError(f"unknown raw dtype {array.dtype!r}")
        raw = np.frombuffer(array.data, dtype="<i2")
        if raw.size != int(np.prod(array.shape, dtype=np.int64)):
            raise ValueError(f"{raw.size} values for shape {tuple(array.shape)}")
        if sys.byteorder != "little":  # pragma: no cover
            raw = raw.astype("=i2")
        return torch.from_numpy(raw.copy()).view(dtype).reshape(tuple(array.shape))
    values = array.numpy()  # np.load with allow_pickle=False: object arrays are refused
    # np.ascontiguousarray makes a 0-d array 1-d; reshape keeps a scalar tensor a scalar.
    return torch.from_numpy(np.ascontiguousarray(values).reshape(values.shape))


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of names, dtypes, shapes and bytes: equal digests mean identical tensors."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def initial_digest(state: ServerState) -> str:
    """One digest of the initial global tensors and the method's initial server state."""
    tensors = {f"global/{k}": v for k, v in state.global_state.items()}
    tensors.update({f"method/{k}": v for k, v in state.method_state.items()})
    return tensors_digest(tensors)


# How Flower's ClientApp runner words an exception: "<class 'module.Name'>:<'message'>".
_RAISED = re.compile(r"<class '(?:[\w.]*\.)?(\w+)'>:<'(.*)'>", re.DOTALL)


def error_reason(reply: Message) -> str:
    """One line for a failed reply: `Name: message` for an exception the ClientApp raised."""
    lines = str(reply.error.reason or "").strip().splitlines()
    if not lines:
        return f"error code {reply.error.code}"
    match = _RAISED.fullmatch(lines[-1])
    return f"{match.group(1)}: {match.group(2)}" if match else lines[-1]
