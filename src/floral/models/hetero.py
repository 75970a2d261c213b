"""A family of five CNNs that differ in width and depth, for clients whose models differ.

Every architecture is a trunk of its own (3x3 conv stages, each conv, ReLU, 2x2 max-pool, then
a Linear to `FEATURE_WIDTH` and ReLU) followed by two layers whose shapes are the same in all
five: `neck` (F -> F, ReLU) and `head` (F -> classes). The common shapes are where an adapter
of one shape fits every architecture (pFedLoRA attaches its LoRA adapter to them).

`HeteroFamily` holds the five trunks and one `neck`/`head` pair in a single module and routes
each forward through the trunk named by its `arch` buffer. A federated engine keeps one scratch
model for all clients; with the family as that model, a client's private state holds `arch`
and only the tensors its own architecture uses (`keep_architecture`), so the other trunks are
never trained, sent or stored for it. The neck and head are one module in the family but every
client keeps its own copy of them, exactly as if each architecture had its own.

`HeteroCNN` is one architecture alone: the same layers without routing, for methods that
need every client to have the same model (FedAvg, FLoRAL, ...).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from floral.errors import ConfigError
from floral.models.networks import conv_stages

__all__ = [
    "ARCH_BUFFER",
    "FEATURE_WIDTH",
    "HETERO_WIDTHS",
    "SHARED_LAYERS",
    "HeteroCNN",
    "HeteroFamily",
    "architecture_of",
    "keep_architecture",
]

# Conv widths of the five trunks, one entry per conv stage.
HETERO_WIDTHS: tuple[tuple[int, ...], ...] = (
    (8, 16),  # 0: the reference
    (4, 8),  # 1: narrower
    (16, 32),  # 2: wider
    (8, 16, 32),  # 3: deeper
    (8,),  # 4: shallower
)
FEATURE_WIDTH = 64
SHARED_LAYERS: tuple[str, ...] = ("neck", "head")  # same shapes in every architecture
ARCH_BUFFER = "arch"
_TRUNK_PREFIX = "trunks."
_UNSET = -1


def _trunk(input_shape: tuple[int, int, int], widths: tuple[int, ...]) -> nn.Sequential:
    stages, flat = conv_stages(input_shape, widths, "hetero-cnn")
    return nn.Sequential(*stages, nn.Flatten(), nn.Linear(flat, FEATURE_WIDTH), nn.ReLU())


def _check_index(index: int) -> None:
    if not 0 <= index < len(HETERO_WIDTHS):
        raise ConfigError(
            f"model.name: hetero-cnn-{index} does not exist (0 to {len(HETERO_WIDTHS) - 1})"
        )


class HeteroCNN(nn.Module):
    """Architecture `index` of the family on its own: trunk, neck, head."""

    def __init__(self, index: int, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        _check_index(index)
        self.trunk = _trunk(input_shape, HETERO_WIDTHS[index])
        self.neck = nn.Linear(FEATURE_WIDTH, FEATURE_WIDTH)
        self.head = nn.Linear(FEATURE_WIDTH, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.neck(self.trunk(x))))


class HeteroFamily(nn.Module):
    """All five architectures in one module, routed by the `arch` buffer (-1 until assigned)."""

    arch: Tensor

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        self.trunks = nn.ModuleList(_trunk(input_shape, w) for w in HETERO_WIDTHS)
        self.neck = nn.Linear(FEATURE_WIDTH, FEATURE_WIDTH)
        self.head = nn.Linear(FEATURE_WIDTH, num_classes)
        self.register_buffer(ARCH_BUFFER, torch.tensor(_UNSET))

    def forward(self, x: Tensor) -> Tensor:
        index = int(self.arch)
        if index == _UNSET:
            # A method that does not assign architectures would silently train trunk 0 for all.
            raise ConfigError(
                "model.name: 'hetero-cnn' gives each client its own architecture; use a method "
                "that assigns them (pfedlora, local-hetero) or one architecture (hetero-cnn-0)"
            )
        return self.head(torch.relu(self.neck(self.trunks[index](x))))


def architecture_of(client_id: int) -> int:
    """Client k gets architecture k mod 5."""
    return client_id % len(HETERO_WIDTHS)


def keep_architecture(state: Mapping[str, Tensor], arch: int) -> dict[str, Tensor]:
    """`state` without the tensors of the other architectures' trunks, and `arch` set."""
    own = f"{_TRUNK_PREFIX}{arch}."
    kept = {
        name: tensor
        for name, tensor in state.items()
        if not name.startswith(_TRUNK_PREFIX) or name.startswith(own)
    }
    if ARCH_BUFFER in kept:
        kept[ARCH_BUFFER] = torch.tensor(arch)
    return kept
