"""Evaluation of one client's model on its own test data."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["EvalResult", "evaluate"]


@dataclass
class EvalResult:
    """Sums over a client's test examples, so results add up across clients exactly."""

    loss_sum: float
    # Correct predictions (classification), squared error (regression), or, for causal LMs,
    # the summed next-token cross-entropy (perplexity = exp(score_sum / count)).
    score_sum: float
    count: int  # examples; target tokens for causal LMs


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str, batch_size: int = 2048
) -> EvalResult:
    if model.training:
        model.eval()
    if kind == "causal-lm":
        return _evaluate_causal_lm(model, x, y, batch_size)
    loss_sum = score_sum = 0.0
    for start in range(0, len(x), batch_size):
        out = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        if kind == "classification":
            loss_sum += nn.functional.cross_entropy(out, target, reduction="sum").item()
            score_sum += (out.argmax(dim=-1) == target).sum().item()
        else:
            # Per-example mean over output dims, as nn.MSELoss averages them.
            sq = (out - target).pow(2).reshape(len(target), -1).mean(dim=1).sum().item()
            loss_sum += sq
            score_sum += sq
    return EvalResult(loss_sum, score_sum, len(x))


# Tokens per evaluation batch of a language model: its logits are tokens x vocabulary floats
# (8192 x 49152 x 4 bytes = 1.6 GB for SmolLM2), so the eval batch is capped by this.
LM_EVAL_TOKENS = 8192


def _evaluate_causal_lm(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> EvalResult:
    """Summed next-token cross-entropy over all target tokens."""
    batch_size = max(1, min(batch_size, LM_EVAL_TOKENS // max(1, x.shape[-1])))
    loss_sum = 0.0
    for start in range(0, len(x), batch_size):
        out = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        loss_sum += nn.functional.cross_entropy(
            out.flatten(0, -2), target.flatten(), reduction="sum"
        ).item()
    return EvalResult(loss_sum, loss_sum, y.numel())
