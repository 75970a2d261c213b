"""What a task asks of a model: its training loss, its test sums, its headline metric.

A task's kind (classification, regression, causal-lm) is dispatched here once: everything that
trains or evaluates receives an `Objective` and calls its methods, never a `kind` string.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from floral.errors import ConfigError
from floral.train.device import Placement

__all__ = [
    "IGNORE_INDEX", "Crop", "EvalResult", "LossFn", "Objective", "crop_padding", "get_objective",
    "keep_all", "next_token_loss",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# A batch (x, y) -> the same batch without the columns its loss cannot see.
Crop = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# Tokens per evaluation batch of a language model: its logits are tokens x vocabulary floats
# (8192 x 49152 x 4 bytes = 1.6 GB for SmolLM2), so the eval batch is capped by this.
LM_EVAL_TOKENS = 8192
# A causal-LM target that gets no loss (a prompt or padding token): PyTorch's ignore_index.
IGNORE_INDEX = -100


@dataclass
class EvalResult:
    """Sums over a client's test examples, so results add up across clients exactly."""

    loss_sum: float
    # Correct predictions (classification), squared error (regression), or, for causal LMs,
    # the summed next-token cross-entropy (perplexity = exp(score_sum / count)).
    score_sum: float
    count: int  # examples; target tokens (those not IGNORE_INDEX) for causal LMs
    # Further sums that add up across clients, e.g. the chrF statistics and exact matches of
    # generated text (floral.train.text_metrics).
    extra: dict[str, float] = field(default_factory=dict)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions whose target is not IGNORE_INDEX (a prompt's or
    padding's): logits (..., vocab), targets (...) already shifted by one token (the task
    stores the next tokens as y). Ignored positions get no loss and no gradient."""
    return nn.functional.cross_entropy(
        logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX
    )


def keep_all(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x, y


def crop_padding(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal-LM batch without its trailing columns in which no row has a target.

    Prompts and responses are padded on the right to `task.max_length`, and a causal model's
    logits at a position never depend on later ones, so these columns change neither the loss
    nor its gradient: they only cost time (a batch of short translations is mostly padding)."""
    has_target = (y != IGNORE_INDEX).any(dim=0).nonzero()
    width = int(has_target[-1]) + 1 if len(has_target) else 1
    return x[..., :width], y[..., :width]


@dataclass(frozen=True)
class Objective:
    """One task kind: `loss` trains, `evaluate` sums test results, `headline` reports them."""

    kind: str
    metric: str  # the headline metric's name: accuracy (%), mse or perplexity
    loss: LossFn  # the mean loss of a batch
    crop: Crop = keep_all  # applied to every batch before the model sees it

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048,
        placement: Placement | None = None,
    ) -> EvalResult:
        """Test sums of `model` on (x, y), in batches moved to the placement's device."""
        if model.training:
            model.eval()
        if self.kind == "causal-lm":
            batch_size = max(1, min(batch_size, LM_EVAL_TOKENS // max(1, x.shape[-1])))
        placement = placement or Placement()
        device = placement.device
        total = EvalResult(0.0, 0.0, 0)
        for start in range(0, len(x), batch_size):
            xb, yb = self.crop(x[start : start + batch_size], y[start : start + batch_size])
            with placement.autocast():
                out = model(xb.to(device))
            target = yb.to(device)
            loss_sum, score_sum, count = self._sums(out.float(), target)
            total.loss_sum += loss_sum
            total.score_sum += score_sum
            total.count += count
        return total

    def _sums(self, out: torch.Tensor, target: torch.Tensor) -> tuple[float, float, int]:
        if self.kind == "classification":
            loss = nn.functional.cross_entropy(out, target, reduction="sum").item()
            return loss, (out.argmax(dim=-1) == target).sum().item(), len(target)
        if self.kind == "causal-lm":
            loss = nn.functional.cross_entropy(
                out.flatten(0, -2), target.flatten(), reduction="sum", ignore_index=IGNORE_INDEX
            ).item()
            return loss, loss, int((target != IGNORE_INDEX).sum().item())
        # Per-example mean over output dims, as nn.MSELoss averages them.
        sq = (out - target).pow(2).reshape(len(target), -1).mean(dim=1).sum().item()
        return sq, sq, len(target)

    def headline(self, mean_score: float) -> float:
        """The reported metric from the mean score per example (or per token)."""
        if self.kind == "classification":
            return 100.0 * mean_score
        if self.kind == "causal-lm":
            return math.exp(min(mean_score, 700.0))  # exp overflows past ~709
        return mean_score


_OBJECTIVES = {
    "classification": Objective("classification", "accuracy", nn.functional.cross_entropy),
    "regression": Objective("regression", "mse", nn.functional.mse_loss),
    "causal-lm": Objective("causal-lm", "perplexity", next_token_loss, crop_padding),
}


def get_objective(kind: str) -> Objective:
    """The objective of a task kind (`FederatedTask.kind`)."""
    objective = _OBJECTIVES.get(kind)
    if objective is None:
        raise ConfigError(f"task kind {kind!r}: unknown (choose from {', '.join(_OBJECTIVES)})")
    return objective
