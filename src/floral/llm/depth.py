"""A pretrained language model cut to its first N decoder blocks (`model.layers = N`), and a
family of such cuts in one model (`model.depths = [30, 20, 10]`).

A family of models of one architecture at several depths shares its embeddings, its head and
the blocks they keep (pFedLoRA's clients of different sizes, or a cheap draft of a model).

The family is one module, as `hetero-cnn` is for CNNs: the full model, whose list of decoder
blocks is replaced by `DepthBlocks`, a list that holds every block (its state_dict is the full
model's) but that the decoder's loop sees cut to the first `floral_depth` blocks. Llama-style
decoders loop over `layers[:num_hidden_layers]`, GPT-2 over `iter(h)`: both go through the
list, so a forward, a no-grad evaluation and transformers' `generate` with its key/value cache
all run the cut model, and nothing is copied or swapped per call. The depth is a buffer, so a
federated engine sets it by loading a client's private state like any other tensor. Block i
keeps its `layer_idx`, which is i in the cut model too, so the cache's layers agree.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, overload

import torch
from torch import Tensor, nn

from floral.errors import ConfigError

__all__ = [
    "DEPTHS_BUFFER",
    "DEPTH_BUFFER",
    "DepthBlocks",
    "block_of",
    "blocks_beyond",
    "client_depth",
    "decoder_blocks",
    "depth_family",
    "family_depths",
    "keep_depth",
    "keep_first_blocks",
    "make_depth_family",
]

# Where transformers models keep their decoder blocks, by the decoder's attribute.
_BLOCK_LISTS = ("layers", "h", "blocks", "block")
# Buffers of the block list (named after it, e.g. `lm.model.layers.floral_depth`): the depth
# the forward runs (-1 until a method assigns one), and the family's depths.
DEPTH_BUFFER = "floral_depth"
DEPTHS_BUFFER = "floral_depths"
_UNSET = -1


def _block_list(lm: Any) -> tuple[nn.Module, str, nn.ModuleList]:
    decoder = lm.get_decoder()
    for attribute in _BLOCK_LISTS:
        blocks = getattr(decoder, attribute, None)
        if isinstance(blocks, nn.ModuleList):
            return decoder, attribute, blocks
    raise ConfigError(f"model.layers: no list of decoder blocks found in {type(lm).__name__}")


def decoder_blocks(lm: Any) -> nn.ModuleList:
    """The transformers model's list of decoder blocks (Llama's `model.layers`, GPT-2's
    `transformer.h`, ...)."""
    return _block_list(lm)[2]


def keep_first_blocks(lm: Any, count: int) -> None:
    """Keep the first `count` decoder blocks of `lm` (in place), and say so in its config, so
    that caches, masks and saved copies agree with the model."""
    blocks = decoder_blocks(lm)
    if isinstance(blocks, DepthBlocks):
        raise ConfigError("model.layers: the model is a family of depths already (model.depths)")
    if not 1 <= count <= len(blocks):
        raise ConfigError(
            f"model.layers: {count} asked, the model has {len(blocks)} decoder blocks "
            f"(choose 1 to {len(blocks)}, or 0 for all)"
        )
    del blocks[count:]
    config = lm.config
    config.num_hidden_layers = count  # GPT-2's n_layer is an alias of it
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list):  # per-block attention kinds (sliding, full)
        config.layer_types = layer_types[:count]


class DepthBlocks(nn.ModuleList):
    """Every decoder block of the full model, of which iteration and slicing give only the
    first `floral_depth`: the view the decoder's loop takes. `len` and integer indexing still
    see every block, as ModuleList's own bookkeeping (append, del) needs."""

    floral_depth: Tensor
    floral_depths: Tensor

    def __init__(self, blocks: Iterable[nn.Module], depths: Sequence[int]) -> None:
        super().__init__(blocks)
        self.register_buffer(DEPTH_BUFFER, torch.tensor(_UNSET))
        self.register_buffer(DEPTHS_BUFFER, torch.tensor(list(depths)))

    def running(self) -> list[nn.Module]:
        """The blocks a forward runs."""
        depth = int(self.floral_depth)
        if depth == _UNSET:
            # A method that does not assign depths would silently run the full model for all.
            raise ConfigError(
                "model.depths: each client runs its own depth of the model; use a method that "
                "assigns them (pfedlora, local-hetero), or one depth for all (model.layers)"
            )
        return list(self._modules.values())[:depth]  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.running())

    @overload
    def __getitem__(self, idx: slice) -> nn.ModuleList: ...

    @overload
    def __getitem__(self, idx: int) -> nn.Module: ...

    def __getitem__(self, idx: int | slice) -> nn.Module | nn.ModuleList:
        if isinstance(idx, slice):
            # A plain list: a slice of the running blocks, not a family of its own.
            return nn.ModuleList(self.running()[idx])
        return super().__getitem__(idx)

    def __repr__(self) -> str:  # ModuleList's iterates, which needs a depth
        return nn.Module.__repr__(self)

    def extra_repr(self) -> str:
        return f"depth={int(self.floral_depth)}, depths={self.floral_depths.tolist()}"


def make_depth_family(lm: Any, depths: Sequence[int]) -> None:
    """Turn `lm` (in place) into the family of its cuts to `depths` blocks: client k runs the
    first depths[k mod len(depths)] blocks (`client_depth`), then the final norm and head."""
    decoder, attribute, blocks = _block_list(lm)
    if not depths:
        raise ConfigError("model.depths: give at least one depth, or leave it out")
    bad = [d for d in depths if not 1 <= d <= len(blocks)]
    if bad:
        raise ConfigError(
            f"model.depths: {bad[0]} asked, the model has {len(blocks)} decoder blocks "
            f"(choose depths of 1 to {len(blocks)})"
        )
    setattr(decoder, attribute, DepthBlocks(blocks, depths))


def depth_family(model: nn.Module) -> tuple[str, list[int]] | None:
    """(the state_dict prefix of the family's blocks, its depths), or None for another model."""
    for name, module in model.named_modules():
        if isinstance(module, DepthBlocks):
            return (f"{name}." if name else ""), [int(d) for d in module.floral_depths]
    return None


def _depths_key(state: Mapping[str, Tensor]) -> str | None:
    for name in state:
        if name == DEPTHS_BUFFER or name.endswith(f".{DEPTHS_BUFFER}"):
            return name
    return None


def family_depths(state: Mapping[str, Tensor]) -> tuple[str, list[int]] | None:
    """What `depth_family` says, read from a model's state_dict: None without the family."""
    key = _depths_key(state)
    if key is None:
        return None
    return key[: -len(DEPTHS_BUFFER)], [int(d) for d in state[key]]


def client_depth(depths: Sequence[int], client_id: int) -> int:
    """Client k runs depths[k mod len(depths)] blocks."""
    return depths[client_id % len(depths)]


def block_of(name: str, prefix: str) -> int | None:
    """The index of the block a tensor named `name` belongs to, or None outside the blocks."""
    if not name.startswith(prefix):
        return None
    match = re.match(r"(\d+)\.", name[len(prefix) :])
    return int(match.group(1)) if match else None


def blocks_beyond(names: Iterable[str], prefix: str, depth: int) -> list[str]:
    """The names of tensors in blocks `depth` and deeper."""
    out = []
    for name in names:
        block = block_of(name, prefix)
        if block is not None and block >= depth:
            out.append(name)
    return out


def keep_depth(state: Mapping[str, Tensor], client_id: int) -> dict[str, Tensor]:
    """The tensors of a family's `state` that client `client_id` runs, its depth set: blocks
    beyond its depth, and the family's list of depths, are left out (not copied)."""
    found = family_depths(state)
    if found is None:
        raise ValueError("keep_depth: the state is not of a family of depths (model.depths)")
    prefix, depths = found
    depth = client_depth(depths, client_id)
    beyond = set(blocks_beyond(state, prefix, depth))
    kept = {
        name: tensor
        for name, tensor in state.items()
        if name not in beyond and name != prefix + DEPTHS_BUFFER
    }
    kept[prefix + DEPTH_BUFFER] = torch.tensor(depth)
    return kept
