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
    score_sum: float  # correct predictions (classification) or squared error (regression)
    count: int


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str, batch_size: int = 2048
) -> EvalResult:
    if model.training:
        model.eval()
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
