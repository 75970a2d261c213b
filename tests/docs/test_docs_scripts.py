"""The scripts in scripts/ that docs/results.md and docs/llm*.md run on finished runs."""

from __future__ import annotations

import csv
import json
import runpy
import shutil
import statistics
import subprocess
import sys

import pytest
import torch
from support import ROOT

from floral.experiment import resolve_config
from floral.run import run_experiment

SCRIPTS = ROOT / "scripts"
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
        [sys.executable, str(SCRIPTS / "router_margin.py"), str(tmp_path)],
        capture_output=True, text=True, check=True,
    )
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert lines["clients with an assignment"] == "8 of 8"
    # The assignments it reads back score what the engine reported at the last round.
    assert float(lines["ARI, assigned"]) == pytest.approx(summary.final["router_ari"], abs=0.005)
    for key in ("margin of the assigned adaptor, training samples",
                "margin of the assigned adaptor, test samples"):
        float(lines[key])  # a number


def test_llm_family_table_reads_the_grid_it_summarizes(tmp_path):
    pytest.importorskip("transformers")
    import tomli_w
    from support.data import translations_config, write_locale

    from floral.cli import main

    task = dict(translations_config(write_locale(tmp_path / "locale")).__dict__)
    config = tmp_path / "tiny.toml"
    config.write_text(tomli_w.dumps({
        "name": "tiny-family", "task": task, "model": {"name": "tiny-llama"},
        "method": {"name": "fedit", "rank": 2, "bias": False, "include": ["*.q_proj"]},
        "train": {"rounds": 2, "clients_per_round": 0.5, "batch_size": 2, "lr": 0.01},
        "engine": {"eval_every": 1},
    }))
    out = tmp_path / "grid"
    assert main(["sweep", str(config), "--methods", "fedit,ffa-lora", "--seeds", "0,1",
                 "--out", str(out), "--quiet", "--jobs", "1", "--no-plots",
                 "--set", 'method.include=["*.q_proj"]', "--set", "method.rank=2",
                 "--set", "method.bias=false"]) == 0
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "llm_family.py"), str(out), "--round", "1",
         "--figures", str(tmp_path / "fig")],
        capture_output=True, text=True, check=True,
    )
    cells = [[c.strip() for c in line.strip("|").split("|")]
             for line in result.stdout.splitlines() if line.startswith("| ")]
    rows = {row[0]: row for row in cells}
    separator = next(line for line in result.stdout.splitlines() if line.startswith("|---"))
    assert {len(row) for row in cells} == {separator.count("|") - 1}  # one width for all
    def rounds(seed):
        path = out / "tiny-family" / "fedit" / f"seed{seed}" / "metrics.csv"
        with open(path) as f:
            rows = list(csv.DictReader(f))
        return {int(r["round"]): {k: float(v) for k, v in r.items() if v} for r in rows}

    history = [rounds(0), rounds(1)]
    fedit = rows["FedIT"]
    assert fedit[1] == "2"
    chrf = [h[1]["chrf"] for h in history]  # the row is round 1, not the last
    assert fedit[2] == f"{statistics.fmean(chrf):.1f} ± {statistics.stdev(chrf):.1f}"
    assert fedit[3] == f"{statistics.fmean(h[1]['chrf_cluster0'] for h in history):.1f}"
    # The seeds hold out different strings: the frozen base is their mean.
    base = statistics.fmean(h[0]["chrf"] for h in history)
    assert rows["frozen base (round 0)"][2] == f"{base:.1f}"
    summary = json.loads((out / "tiny-family" / "fedit" / "seed0" / "summary.json").read_text())
    # 2 of 4 clients a round, 2 rounds: 4 client-rounds.
    assert fedit[7] == f"{summary['bytes_up'] / 4 / 1e6:.3g}"
    assert float(rows["FFA-LoRA"][7]) == pytest.approx(float(fedit[7]) / 2, rel=0.01)  # no A
    copy_scores = runpy.run_path(str(SCRIPTS / "copy_source.py"))["copy_scores"]
    from floral.experiment import load_config

    expected = statistics.fmean(
        copy_scores(load_config(config, [f"seed={seed}"]))["all"]["chrf"] for seed in (0, 1)
    )
    assert rows["copy the English string"][2] == f"{expected:.1f}"
    for figure in ("llm-family-bytes.png", "llm-family-languages.png"):
        assert (tmp_path / "fig" / figure).stat().st_size > 5000
    # --exact: exact match per language, the mean of the seeds' per-cluster figures.
    exact = subprocess.run(
        [sys.executable, str(SCRIPTS / "llm_family.py"), str(out), "--round", "1", "--exact"],
        capture_output=True, text=True, check=True,
    )
    exact_rows = {row[0]: row for row in (
        [c.strip() for c in line.strip("|").split("|")]
        for line in exact.stdout.splitlines() if line.startswith("| ")
    )}
    assert exact_rows["FedIT"][2] == f"{statistics.fmean(h[1]['exact_match'] for h in history):.1f}"
    for c in (0, 1):
        mean = statistics.fmean(h[1][f"exact_match_cluster{c}"] for h in history)
        assert exact_rows["FedIT"][3 + c] == f"{mean:.1f}"


def test_first_gradients_are_the_loss_s_own_derivative(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    import tomli_w
    from support.data import translations_config, write_locale

    task = dict(translations_config(write_locale(tmp_path / "locale")).__dict__)
    config = tmp_path / "tiny.toml"
    config.write_text(tomli_w.dumps({
        "name": "tiny-gradients", "task": task, "model": {"name": "tiny-llama"},
        "method": {"name": "floral"},
    }))
    script = runpy.run_path(str(SCRIPTS / "first_gradients.py"))
    gradients, clusters = script["client_gradients"](str(config), 0, [])
    assert gradients.shape[0] == len(clusters) == 4 and gradients.abs().sum() > 0
    # Client 2's gradient against a central difference of its loss along a random direction
    # of the B factors (the script's own order: named_parameters).
    from floral.experiment import build_setup, load_config
    from floral.train.objective import get_objective

    sets = [*script["FAMILY"], "method.name=local-adaptor", "method.train_base=false", "seed=0"]
    _, built, model = build_setup(load_config(config, sets))
    client = built.clients[2]
    factors = [p for n, p in model.named_parameters() if n.endswith("lora_B")]
    size = sum(p.numel() for p in factors)
    direction = torch.randn(size, generator=torch.Generator().manual_seed(0))
    loss = get_objective(built.kind).loss

    def loss_at(step: float) -> float:
        with torch.no_grad():
            offset = 0
            for p in factors:
                p.copy_(step * direction[offset: offset + p.numel()].view_as(p))
                offset += p.numel()
            return float(loss(model(client.x_train), client.y_train).double())

    eps = 1e-3
    numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert float(gradients[2] @ direction) == pytest.approx(numeric, rel=2e-2, abs=1e-4)
    monkeypatch.setattr(sys, "argv", ["first_gradients.py", str(config)])
    script["main"]()
    printed = capsys.readouterr().out
    assert "cosine of the first gradients" in printed and "length of the mean gradient" in printed


def test_llm_larger_tables_read_the_kept_records_only(tmp_path):
    pytest.importorskip("transformers")
    import tomli_w
    from support.data import translations_config, write_locale

    from floral.checkpoint import read_toml
    from floral.cli import main
    from scripts.copy_source import copy_scores

    task = dict(translations_config(write_locale(tmp_path / "locale")).__dict__)
    config = tmp_path / "tiny.toml"
    config.write_text(tomli_w.dumps({
        "name": "tiny-larger", "task": task, "model": {"name": "tiny-llama"},
        "method": {"name": "fedit", "rank": 2, "bias": False, "include": ["*.q_proj"]},
        "train": {"rounds": 2, "batch_size": 2, "lr": 0.01},
        "engine": {"eval_every": 1},
    }))
    out = tmp_path / "grid"
    methods = "fedit,floral,floral-oracle:train_base=false"
    assert main(["sweep", str(config), "--methods", methods, "--seeds", "0,1",
                 "--out", str(out / "up-rev"), "--quiet", "--jobs", "1", "--no-plots",
                 "--set", "method.rank=2", "--set", "method.bias=false"]) == 0
    # A tiny model's chrF is 0 everywhere: distinct planted scores show which cell reads what.
    for i, folder in enumerate(sorted((out / "up-rev" / "tiny-larger").glob("*/seed*"))):
        with open(folder / "metrics.csv") as f:
            history = list(csv.DictReader(f))
        history[-1]["chrf"] = str(10.0 + 7.3 * i)
        history[-1]["exact_match"] = str(1.0 + 2.1 * i)
        with open(folder / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)
    kept = tmp_path / "kept"
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "llm_larger.py"), str(out), "--keep", str(kept),
         "--figures", str(tmp_path / "fig")],
        capture_output=True, text=True, check=True,
    )
    assert result.stdout.startswith(f"kept the records of 6 runs in {kept}")
    files = sorted(p.name for p in (kept / "up-rev" / "tiny-larger" / "fedit" / "seed0").iterdir())
    assert files == sorted(["config.toml", "metrics.csv", "summary.json", "cost.json"])
    # Only the records are needed: the tables printed from the kept copy are the same.
    again = subprocess.run([sys.executable, str(SCRIPTS / "llm_larger.py"), str(kept)],
                           capture_output=True, text=True, check=True)
    assert again.stdout in result.stdout

    def last(method, seed):
        path = out / "up-rev" / "tiny-larger" / method / f"seed{seed}" / "metrics.csv"
        with open(path) as f:
            return {k: float(v) for k, v in list(csv.DictReader(f))[-1].items() if v}

    rows = {}
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 5:  # the headline table
            rows[cells[0]] = cells
    for seed in (0, 1):
        fedit = last("fedit", seed)
        assert rows["FedIT"][1 + seed] == f"{fedit['chrf']:.1f} / {fedit['exact_match']:.1f}"
        saved = out / "up-rev" / "tiny-larger" / "fedit" / f"seed{seed}" / "config.toml"
        copy = copy_scores(resolve_config(read_toml(saved)))["all"]
        assert rows["copy the source"][1 + seed] == (
            f"{copy['chrf']:.1f} / {copy['exact_match']:.1f}")
    cpu = sum(json.loads((out / "up-rev" / "tiny-larger" / "fedit" / f"seed{s}" / "cost.json")
                         .read_text())["cpu_seconds"] for s in (0, 1))
    assert rows["FedIT"][-1] == f"{cpu / 3600:.2f}"
    # The goal table: the learned router against FedIT and the oracle, per setting.
    goal = next(line for line in result.stdout.splitlines()
                if line.startswith("| up-rev, seed 0 | FLoRAL, learned router"))
    cells = [c.strip() for c in goal.strip("|").split("|")]
    floral, oracle = last("floral", 0), last("floral-oracle_train_base=false", 0)
    assert cells[2] == f"{floral['chrf'] - last('fedit', 0)['chrf']:+.1f}"
    assert cells[4] == f"{oracle['chrf'] - floral['chrf']:+.1f}"
    assert cells[5] == f"{floral['router_ari']:.2f}"
    assert (tmp_path / "fig" / "llm-larger-curves.png").stat().st_size > 5000
    # A fresh clone has only the kept records: as scripts/llm_larger.sh does, they seed the
    # grid's folder, and the sweep counts those runs as finished (the planted scores stay).
    fresh = tmp_path / "fresh"
    shutil.copytree(kept, fresh)
    assert main(["sweep", str(config), "--methods", methods, "--seeds", "0,1",
                 "--out", str(fresh / "up-rev"), "--quiet", "--jobs", "1", "--no-plots",
                 "--set", "method.rank=2", "--set", "method.bias=false"]) == 0
    for name in ("fedit", "floral"):
        planted = kept / "up-rev" / "tiny-larger" / name / "seed1" / "metrics.csv"
        assert (fresh / "up-rev" / "tiny-larger" / name / "seed1" / "metrics.csv").read_text() \
            == planted.read_text()
