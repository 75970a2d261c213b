"""chrF and exact match on the Flower engine: the same rows as the local engine's.

A tiny translations task (two made-up languages written as .mo files by the test, the
`tiny-llama` model, a byte tokenizer). Each Flower client generates from its held-out prompts
and sends summable statistics; the server adds them up. The rows must be the local engine's,
which generate in one process, and cluster 0's chrF must be sacrebleu's own corpus chrF of the
answers generated again from the run's saved state.
"""

from __future__ import annotations

import csv
import math

import pytest

pytest.importorskip("flwr")

from support.data import translations_config, write_locale  # noqa: E402
from support.flower import run_loopback  # noqa: E402

from floral.engines.flower.options import FlowerOptions  # noqa: E402
from floral.experiment import resolve_config  # noqa: E402
from floral.run import run_experiment  # noqa: E402


def _experiment(root):
    task = dict(translations_config(root).__dict__)
    return {
        "name": "tiny-translations",
        "task": task,
        "model": {"name": "tiny-llama"},
        "method": {
            "name": "floral",
            "rank": 2,
            "train_base": False,
            "bias": False,
            "include": ["*.q_proj", "*.v_proj"],
        },
        "train": {
            "rounds": 2,
            "clients_per_round": 1.0,
            "batch_size": 2,
            "lr": 0.01,
            "optimizer": "adamw",
        },
        "engine": {"eval_every": 1},
    }


def _rows(folder):
    with (folder / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def _generation_columns(rows):
    return sorted(k for k in rows[0] if k.startswith(("chrf", "exact_match")))


def _same_rows(got, expected):
    columns = _generation_columns(expected)
    assert columns and _generation_columns(got) == columns
    assert {"chrf", "chrf_cluster1", "exact_match_client3"} <= set(columns)
    assert [r["round"] for r in got] == [r["round"] for r in expected] == ["0", "1", "2"]
    for mine, theirs in zip(got, expected, strict=True):
        for column in [*columns, "perplexity", "perplexity_client0"]:
            assert math.isclose(
                float(mine[column]), float(theirs[column]), rel_tol=1e-6, abs_tol=1e-9
            ), (mine["round"], column)


def test_flower_clients_report_the_local_engines_chrf_rows(tmp_path):
    sacrebleu = pytest.importorskip("sacrebleu")
    from floral.data import build_task
    from floral.export import generate_answers

    config = resolve_config(_experiment(write_locale(tmp_path / "locale")))
    run_experiment(config, tmp_path / "local")
    summary, _ = run_loopback(config, tmp_path / "flower")
    _same_rows(_rows(tmp_path / "flower"), _rows(tmp_path / "local"))

    # Independently: sacrebleu on the answers generated again from the local run's state.
    task = build_task(config.task, config.seed)
    hyps, refs = [], []
    for client in task.clients:
        if client.cluster == 0 and client.generation is not None:
            hyps += generate_answers(
                tmp_path / "local", client.client_id, client.generation.sources
            )
            refs += client.generation.references
    assert math.isclose(
        summary.final["chrf_cluster0"], sacrebleu.corpus_chrf(hyps, [refs]).score, abs_tol=1e-6
    )


# A Ray simulation costs 30-60 s to start here.
@pytest.mark.slow
def test_a_flower_simulation_reports_the_local_engines_chrf_rows(tmp_path):
    pytest.importorskip("ray")
    from floral.flower_app import simulate

    data = _experiment(write_locale(tmp_path / "locale"))
    run_experiment(resolve_config(data), tmp_path / "local")
    simulate(
        resolve_config(data, ["engine.name=flower"]),
        tmp_path / "flower",
        options=FlowerOptions(round_timeout=300.0, node_timeout=60.0),
    )
    _same_rows(_rows(tmp_path / "flower"), _rows(tmp_path / "local"))
