"""Short end-to-end runs of whole experiments: the orderings the paper's tables claim.

The two ordering runs are marked slow (`pytest -m slow`); their settings and methods also run
for 5 rounds in the default tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support.results import assert_final_accuracy_is_the_saved_states, assert_trained

from floral.cli import main
from floral.experiment import resolve_config
from floral.methods import method_names
from floral.run import run_experiment

DIGITS_LABEL_SHIFT = {
    "name": "digits-label-shift",
    "task": {"dataset": "digits", "shift": "label-shift", "num_clients": 20, "num_clusters": 4},
    "model": {"name": "mlp", "hidden": [64]},
    "train": {"rounds": 100, "clients_per_round": 0.5, "batch_size": 16, "lr": 0.1,
              "router_lr": 1.0},
    "engine": {"eval_every": 50},
}

SYNTHETIC_MLP = {
    "name": "synthetic-mlp",
    "task": {"dataset": "synthetic-mlp", "shift": "none", "num_clients": 20, "num_clusters": 4},
    "model": {"name": "mlp", "hidden": [20]},
    "train": {"rounds": 100, "clients_per_round": 1.0, "batch_size": 8, "lr": 0.03,
              "router_lr": 0.1},
    "engine": {"eval_every": 50},
}


def _final(base: dict, method: str, out: Path, *overrides: str) -> float:
    config = resolve_config({**base, "method": {"name": method}}, overrides)
    summary = run_experiment(config, out / method)
    return summary.final[summary.metric]


@pytest.mark.slow
def test_synthetic_mlp_oracle_floral_mse_is_10x_below_fedavg(tmp_path):
    fedavg = _final(SYNTHETIC_MLP, "fedavg", tmp_path)
    oracle = _final(SYNTHETIC_MLP, "floral-oracle", tmp_path)
    assert oracle * 10 <= fedavg, (oracle, fedavg)


@pytest.mark.slow
def test_label_shift_floral_beats_fedavg_by_30_points(tmp_path):
    fedavg = _final(DIGITS_LABEL_SHIFT, "fedavg", tmp_path)
    floral = _final(DIGITS_LABEL_SHIFT, "floral", tmp_path)
    assert floral >= fedavg + 30, (floral, fedavg)


# The two slow runs above, 5 rounds instead of 100: the same settings and methods learn.
@pytest.mark.parametrize(
    ("base", "method"),
    [(SYNTHETIC_MLP, "fedavg"), (SYNTHETIC_MLP, "floral-oracle"),
     (DIGITS_LABEL_SHIFT, "fedavg"), (DIGITS_LABEL_SHIFT, "floral")],
    ids=["synthetic-mlp-fedavg", "synthetic-mlp-floral-oracle", "digits-label-shift-fedavg",
         "digits-label-shift-floral"],
)
def test_short_runs_of_the_slow_settings_lower_the_test_loss(tmp_path, base, method):
    config = resolve_config({**base, "method": {"name": method}},
                            ["train.rounds=5", "engine.eval_every=5"])
    summary = run_experiment(config, tmp_path)
    assert summary.final["loss"] < summary.history[0]["loss"], summary.history


def _write_cifar10(folder: Path, per_file: int = 60) -> None:
    """Tiny files in the CIFAR-10 binary format: label byte + 3072 pixel bytes per record."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for name in names:
        labels = rng.integers(0, 10, per_file, dtype=np.uint8)
        pixels = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        np.concatenate([labels[:, None], pixels], axis=1).tofile(folder / name)


# Methods whose clients each have their own architecture run on the hetero-cnn family
# (tests/test_heterogeneous.py); every other method must run on the paper's CNN.
OWN_ARCHITECTURE = {"pfedlora", "local-hetero"}


@pytest.mark.parametrize("method", [m for m in method_names() if m not in OWN_ARCHITECTURE])
def test_every_method_runs_a_conv_model_on_cifar_format_files(tmp_path, method):
    _write_cifar10(tmp_path / "cifar")
    config = resolve_config({
        "name": "tiny-cifar",
        "task": {"dataset": "cifar10", "shift": "rotate", "num_clients": 4, "num_clusters": 2,
                 "data_dir": str(tmp_path / "cifar")},
        "model": {"name": "cnn"},
        "method": {"name": method},
        "train": {"rounds": 2, "clients_per_round": 1.0, "batch_size": 32},
        "engine": {"eval_every": 1},
    })
    summary = run_experiment(config, tmp_path / "out")
    assert summary.rounds == 2
    assert_trained(summary)
    assert_final_accuracy_is_the_saved_states(config, summary)
    expected_up = 0 if method == "local" else 1
    assert (summary.bytes_up > 0) == bool(expected_up)


def test_compare_writes_table_csv_and_plot(tmp_path, capsys):
    config = tmp_path / "digits.toml"
    config.write_text(
        'name = "digits"\n[task]\ndataset = "digits"\nshift = "label-shift"\n'
        "num_clients = 8\nnum_clusters = 2\n[model]\nname = \"mlp\"\nhidden = [16]\n"
        "[train]\nrounds = 3\nclients_per_round = 0.5\nbatch_size = 16\n[engine]\neval_every = 1\n"
    )
    out = tmp_path / "cmp"
    code = main(["compare", str(config), "--methods", "fedavg,floral:rank=2",
                 "--seeds", "0,1", "--out", str(out), "--quiet", "--jobs", "1"])
    assert code == 0
    table = (out / "comparison.md").read_text()
    assert "| fedavg |" in table and "| floral:rank=2 |" in table
    assert (out / "comparison.csv").read_text().count("\n") == 3
    assert (out / "curves.png").stat().st_size > 1000
    for folder in ("fedavg", "floral_rank=2"):
        for seed in (0, 1):
            assert (out / folder / f"seed{seed}" / "summary.json").exists()
    # A second call finds every run finished and reruns none of them.
    before = (out / "fedavg" / "seed0" / "summary.json").stat().st_mtime_ns
    assert main(["compare", str(config), "--methods", "fedavg,floral:rank=2",
                 "--seeds", "0,1", "--out", str(out), "--quiet", "--jobs", "1"]) == 0
    assert (out / "fedavg" / "seed0" / "summary.json").stat().st_mtime_ns == before
    assert "fedavg" in capsys.readouterr().out


def test_method_specs_keep_codec_values_with_colons():
    from floral.compare import parse_method_specs

    (spec,) = parse_method_specs("floral:comm.upload=topk:0.1:rank=0.1")
    assert spec.name == "floral"
    assert dict(spec.options) == {"comm.upload": "topk:0.1", "rank": 0.1}
