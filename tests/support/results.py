"""Checks of a finished run's numbers against its results folder, computed another way.

A short run's accuracy is not worth comparing with a fixed bound (anything in [0, 100] passes);
instead the final row must be what the saved state gives when every client's model predicts
its own test set again, counted here from the predictions, and the run must have moved the
test loss away from its round-0 value.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from floral.experiment import ExperimentConfig, RunSummary, build_engine

__all__ = ["assert_final_accuracy_is_the_saved_states", "assert_trained"]


def accuracy_from_saved_state(config: ExperimentConfig, out: str | Path) -> float:
    """Test accuracy (%) over all clients from `out/state.safetensors`: correct / total."""
    engine, task = build_engine(config)
    engine.load_state_dict(load_file(Path(out) / "state.safetensors"))
    correct = total = 0
    with torch.no_grad():
        for k, client in enumerate(task.clients):
            model = engine.client_model(k).eval()
            correct += int((model(client.x_test).argmax(dim=-1) == client.y_test).sum())
            total += len(client.y_test)
    return 100.0 * correct / total


def assert_final_accuracy_is_the_saved_states(
    config: ExperimentConfig, summary: RunSummary
) -> None:
    expected = accuracy_from_saved_state(config, summary.out_dir)
    assert summary.final["accuracy"] == pytest.approx(expected, abs=1e-9), expected


def assert_trained(summary: RunSummary) -> None:
    """The last evaluation's test loss differs from round 0's: the run changed the model."""
    first, last = summary.history[0], summary.history[-1]
    assert last["round"] == summary.rounds > first["round"] == 0
    assert last["loss"] != first["loss"], (first["loss"], last["loss"])
