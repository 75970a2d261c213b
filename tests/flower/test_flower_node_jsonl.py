"""A node-local jsonl run equals the local engine on the same per-client files, row for row.

Three clients' JSON-lines files: the local engine reads them as one folder (client k = the k-th
file by name), each Flower node reads a folder holding only its own client's file. Each node
must split its examples into train and held-out ones exactly as the local engine splits that
client (seeded by the client's index, not by its position on the node), so every metrics row,
chrF and exact match included, is the local engine's. The held-out prompts each node holds are
also checked against the split the local engine built.
"""

from __future__ import annotations

import csv
import json
import math

import pytest

pytest.importorskip("flwr")

import torch  # noqa: E402
from support.flower import run_loopback  # noqa: E402

from floral.data import build_task  # noqa: E402
from floral.engines.flower.node_data import NodeData, node_task  # noqa: E402
from floral.experiment import resolve_config  # noqa: E402
from floral.run import run_experiment  # noqa: E402

NAMES = ["ana", "ben", "cleo"]  # file k by name is client k on the local engine


def _write_clients(root):
    """Per client: a folder with its one file; the local engine's folder holds all three."""
    everyone = root / "all"
    everyone.mkdir(parents=True)
    sites = []
    for k, name in enumerate(NAMES):
        lines = [
            json.dumps({"prompt": f"{name} says {i * (k + 2)}", "response": f"{i}{name[k]}"})
            for i in range(9)
        ]
        text = "\n".join(lines) + "\n"
        (everyone / f"{name}.jsonl").write_text(text)
        site = root / f"site{k}"
        site.mkdir()
        (site / f"{name}.jsonl").write_text(text)
        sites.append(site)
    return everyone, sites


def _experiment(data_dir):
    return {
        "name": "node-jsonl",
        "seed": 5,
        "task": {"dataset": "jsonl", "shift": "none", "num_clients": len(NAMES),
                 "num_clusters": 1, "data_dir": str(data_dir), "tokenizer": "bytes",
                 "template": "plain", "max_length": 24, "test_fraction": 0.34,
                 "generate_tokens": 3},
        "model": {"name": "tiny-llama"},
        "method": {"name": "floral", "rank": 2, "num_adaptors": 2, "train_base": False,
                   "bias": False, "include": ["*.q_proj", "*.v_proj"]},
        "train": {"rounds": 2, "clients_per_round": 1.0, "batch_size": 2, "lr": 0.01,
                  "optimizer": "adamw"},
        "engine": {"eval_every": 1},
    }


def _rows(folder):
    with (folder / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_each_node_splits_its_file_as_the_local_engine_splits_that_client(tmp_path):
    everyone, sites = _write_clients(tmp_path)
    config = resolve_config(_experiment(everyone))
    local = build_task(config.task, config.seed)
    for k, site in enumerate(sites):
        mine = node_task(config.task, config.seed, NodeData(str(site), k)).clients[k]
        theirs = local.clients[k]
        assert len(mine.x_test) == len(theirs.x_test) == 3
        for name in ("x_train", "y_train", "x_test", "y_test"):
            assert torch.equal(getattr(mine, name), getattr(theirs, name)), (k, name)
        assert mine.generation is not None and theirs.generation is not None
        assert mine.generation.sources == theirs.generation.sources


def test_a_node_local_jsonl_run_gives_the_local_engines_rows(tmp_path):
    everyone, sites = _write_clients(tmp_path)
    config = resolve_config(_experiment(everyone))
    run_experiment(config, tmp_path / "local")
    nodes = {k: {"data-path": str(site)} for k, site in enumerate(sites)}
    run_loopback(config, tmp_path / "flower", node_configs=nodes)

    got, want = _rows(tmp_path / "flower"), _rows(tmp_path / "local")
    assert [r["round"] for r in got] == [r["round"] for r in want] == ["0", "1", "2"]
    columns = [c for c in want[0] if c not in ("seconds", "bytes_down", "bytes_up")
               and not c.startswith("router")]
    assert {"perplexity", "perplexity_client2", "chrf", "exact_match_client1"} <= set(columns)
    for mine, theirs in zip(got, want, strict=True):
        for column in columns:
            a, b = float(mine[column]), float(theirs[column])
            assert (math.isnan(a) and math.isnan(b)) or math.isclose(
                a, b, rel_tol=1e-6, abs_tol=1e-9
            ), (mine["round"], column, a, b)
