"""Greedy generation from many prompts at once, with any floral model built on a `CausalLM`.

Prompts are sorted by length and cut into batches of at most `batch_tokens` prompt tokens;
each batch is padded on the left (the attention mask hides the padding, and transformers
derives each row's positions from the mask) and decoded by transformers' `generate` with its
key/value cache: one forward per new token for the whole batch, never a Python loop per
example. Adapted layers are called inside the transformers model, where each draws its router's
pi in eval mode (no noise), so the client's own mixture generates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from floral.errors import ConfigError
from floral.llm.deps import require
from floral.llm.model import CausalLM, quiet_transformers
from floral.train.device import Placement

__all__ = ["GENERATE_BATCH_TOKENS", "greedy_generate"]

# Prompt tokens per generation batch (the cache grows by the batch size per new token).
GENERATE_BATCH_TOKENS = 4096


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    placement: Placement | None = None,
    batch_tokens: int = GENERATE_BATCH_TOKENS,
) -> list[list[int]]:
    """The new tokens greedy decoding gives after each prompt, without the end token."""
    if not isinstance(model, CausalLM):
        raise ConfigError(
            f"task.generate_tokens: generation needs a language model (hf:..., tiny-llama), "
            f"not the {type(model).__name__} this method builds; set task.generate_tokens = 0"
        )
    if any(len(p) == 0 for p in prompts):
        raise ConfigError("task: a prompt to generate from has no tokens")
    placement = placement or Placement()
    device = placement.device
    lm: Any = model.lm  # a transformers PreTrainedModel
    transformers = require("transformers")
    config = transformers.GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_id,
        pad_token_id=pad_id, num_beams=1,
    )
    was_training = model.training
    model.eval()
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    start = 0
    while start < len(order):
        end = start + 1  # sorted by length: the last prompt of a batch is its longest
        while end < len(order) and (end - start + 1) * len(prompts[order[end]]) <= batch_tokens:
            end += 1
        batch = order[start:end]
        width = max(len(prompts[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, width - len(prompts[i]):] = torch.tensor(list(prompts[i]), dtype=torch.long)
            mask[row, width - len(prompts[i]):] = 1
        with quiet_transformers(), placement.autocast():
            generated = lm.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device),
                generation_config=config,
            )
        for row, i in enumerate(batch):
            new = generated[row, width:].tolist()
            out[i] = new[: new.index(eos_id)] if eos_id in new else new
        start = end
    if was_training:
        model.train()
    return out
