"""The scripts docs/results.md runs on finished runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from floral.experiment import resolve_config
from floral.run import run_experiment

DOCS = Path(__file__).resolve().parent.parent / "docs"
TINY_EM = {
    "name": "tiny-digits",
    "task": {"dataset": "digits", "shift": "label-shift", "num_clients": 8, "num_clusters": 2},
    "model": {"name": "mlp", "hidden": [16]},
    "method": {"name": "floral-em"},
    "train": {"rounds": 6, "clients_per_round": 1.0, "batch_size": 16},
    "engine": {"eval_every": 3},
}


def test_router_margin_reports_the_run_s_own_cluster_recovery(tmp_path):
    summary = run_experiment(resolve_config(TINY_EM), tmp_path)
    result = subprocess.run(
        [sys.executable, str(DOCS / "router_margin.py"), str(tmp_path)],
        capture_output=True, text=True, check=True,
    )
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert lines["clients with an assignment"] == "8 of 8"
    # The assignments it reads back score what the engine reported at the last round.
    assert float(lines["ARI, assigned"]) == pytest.approx(summary.final["router_ari"], abs=0.005)
    for key in ("margin of the assigned adaptor, training samples",
                "margin of the assigned adaptor, test samples"):
        float(lines[key])  # a number
