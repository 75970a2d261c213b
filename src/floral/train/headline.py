"""The metrics a run is judged by, in the order every report shows them.

A task's objective has one metric (accuracy, mse or perplexity, `Objective.metric`). Where the
clients generate text (a prompt/response task with `task.generate_tokens > 0`), chrF and exact
match lead, since they score the answers themselves; the objective's metric (perplexity)
follows. The closing line of a run, the compare and sweep tables, the figures and the trackers
all take their order and names from here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = [
    "GENERATION_METRICS",
    "PERCENT_SCALE",
    "axis_label",
    "format_metric",
    "headline_metrics",
    "metric_label",
    "order_headline",
]

# Metrics of generated text (floral.train.text_metrics), in the order they lead.
GENERATION_METRICS: tuple[str, ...] = ("chrf", "exact_match")
# Metrics on a 0-100 scale: tables write them to 0.1 point.
PERCENT_SCALE: tuple[str, ...] = ("accuracy", *GENERATION_METRICS)
_LABELS = {
    "accuracy": "accuracy",
    "mse": "mse",
    "perplexity": "perplexity",
    "chrf": "chrF",
    "exact_match": "exact match",
    "loss": "loss",
    "router_ari": "router ARI",
}
_AXES = {
    "accuracy": "test accuracy (%)",
    "mse": "test MSE",
    "perplexity": "test perplexity",
    "chrf": "chrF of the held-out answers",
    "exact_match": "exact match of the held-out answers (%)",
    "loss": "test loss",
    "router_ari": "router ARI (cluster recovery)",
}
# How a single value is written (a closing line): accuracy as it always was, to 0.01%.
_FORMATS = {"accuracy": "{:.2f}%", "exact_match": "{:.1f}%", "chrf": "{:.2f}"}


def headline_metrics(values: Mapping[str, object], metric: str) -> tuple[str, ...]:
    """The headline metrics of a run whose row (or final metrics) is `values` and whose
    objective reports `metric`: chrF and exact match first where they are there."""
    return (*(key for key in GENERATION_METRICS if key in values), metric)


def order_headline(values: Mapping[str, float], metric: str) -> dict[str, float]:
    """`values` with its headline metrics first, the rest in their order."""
    first = headline_metrics(values, metric)
    return {**{k: values[k] for k in first if k in values},
            **{k: v for k, v in values.items() if k not in first}}


def metric_label(key: str) -> str:
    """A metric's name as a table or a line writes it: chrf -> chrF."""
    return _LABELS.get(key, key)


def axis_label(key: str) -> str:
    """What a figure's axis says for a metrics column."""
    return _AXES.get(key, metric_label(key))


def format_metric(key: str, value: float) -> str:
    """One value of metric `key`: 81.93% (accuracy), 42.31 (chrF), 12.5% (exact match),
    239.96 (perplexity, MSE: five significant digits)."""
    if math.isnan(value):
        return "—"
    return _FORMATS.get(key, "{:.5g}").format(value)
