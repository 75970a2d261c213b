"""The uploads of clients trained together, kept stacked (`Method.finish_batch`).

When the engine trains K clients as one batch (floral.engines.batched), their trained tensors
come stacked on a leading client axis. Building the K uploads from them takes one tensor op per
global tensor instead of K, and checking them (`Method.check_upload_batch`) one reduction per
tensor instead of K: each client's upload is a row of the stacked one, a view that costs no
copy. A server that sees a client's upload still a row of its batch may judge the rows
together; any other upload (a codec or an attack made new tensors) is judged alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from floral.train.state import WEIGHT_SUFFIX, TensorDict

__all__ = ["UploadBatch", "batch_deltas", "client_rows", "private_rows"]


@dataclass(eq=False)
class UploadBatch:
    """Stacked uploads: `tensors[name]` is (K, ...), row i the tensor of client `clients[i]`.
    `rows[i]` is that client's upload, built of views of those rows."""

    clients: tuple[int, ...]
    tensors: TensorDict
    rows: list[TensorDict] = field(init=False)

    def __post_init__(self) -> None:
        self.rows = client_rows(self.tensors, len(self.clients))
        self._row_of = {client: i for i, client in enumerate(self.clients)}

    def holds(self, client: int, upload: Mapping[str, torch.Tensor]) -> bool:
        """Whether `upload` is the client's row itself: the same tensor objects, nothing else
        (a codec or an attack that changed a value made a new tensor)."""
        row = self._row_of.get(client)
        if row is None:
            return False
        mine = self.rows[row]
        return len(upload) == len(mine) and all(upload.get(n) is t for n, t in mine.items())


def client_rows(stacked: Mapping[str, torch.Tensor], clients: int) -> list[TensorDict]:
    """One dict per client of the rows of (K, ...) tensors: views, one `unbind` per tensor."""
    columns = {name: value.unbind(0) for name, value in stacked.items()}
    return [{name: column[i] for name, column in columns.items()} for i in range(clients)]


@torch.no_grad()
def batch_deltas(
    stacked: Mapping[str, torch.Tensor],
    global_state: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor],
) -> TensorDict:
    """`weighted_deltas` of K clients: `w_k * (theta_k - theta)` (K, ...) and `w_k` (K, ...)
    for every global tensor, from the stacked trained tensors and per-client weights."""
    upload: TensorDict = {}
    for name, reference in global_state.items():
        trained, weight = stacked[name], weights[name]
        delta = trained.detach() - reference
        # A client's weight broadcasts to its tensor from the right: (K, *w) -> (K, 1.., *w).
        padding = (1,) * (trained.dim() - weight.dim())
        upload[name] = delta.mul_(weight.reshape(weight.shape[0], *padding, *weight.shape[1:])
                                  .to(delta.device))
        upload[name + WEIGHT_SUFFIX] = weight
    return upload


def private_rows(stacked: Mapping[str, torch.Tensor], names: Sequence[str],
                 clients: int) -> list[TensorDict]:
    """Each client's copy of the named stacked tensors, on the CPU: separate storage, as the
    engine keeps and checkpoints them one client at a time."""
    rows: list[TensorDict] = [{} for _ in range(clients)]
    for name in names:
        for i, value in enumerate(stacked[name].detach().to("cpu").unbind(0)):
            rows[i][name] = value.clone()
    return rows
