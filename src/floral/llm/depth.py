"""A pretrained language model cut to its first N decoder blocks (`model.layers = N`).

A family of models of one architecture at several depths shares its embeddings, its head and
the blocks they keep (pFedLoRA's clients of different sizes, or a cheap draft of a model).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from floral.errors import ConfigError

__all__ = ["decoder_blocks", "keep_first_blocks"]

# Where transformers models keep their decoder blocks, by the decoder's attribute.
_BLOCK_LISTS = ("layers", "h", "blocks", "block")


def decoder_blocks(lm: Any) -> nn.ModuleList:
    """The transformers model's list of decoder blocks (Llama's `model.layers`, GPT-2's
    `transformer.h`, ...)."""
    decoder = lm.get_decoder()
    for attribute in _BLOCK_LISTS:
        blocks = getattr(decoder, attribute, None)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise ConfigError(f"model.layers: no list of decoder blocks found in {type(lm).__name__}")


def keep_first_blocks(lm: Any, count: int) -> None:
    """Keep the first `count` decoder blocks of `lm` (in place), and say so in its config, so
    that caches, masks and saved copies agree with the model."""
    blocks = decoder_blocks(lm)
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
