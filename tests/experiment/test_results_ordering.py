"""Short versions of the tasks of docs/results.md, checking the method orderings it claims.

Each task is the table's setting shrunk (fewer clients, rounds and samples) until it runs in a
few seconds; the assertions are the orderings, with margins measured over several seeds. The
full-size runs are `floral sweep` commands in docs/results.md.

The ordering tests take 5-30 s each and are marked slow (`pytest -m slow`); the default tests
run every (setting, method) pair of theirs for 4 rounds
(test_short_runs_of_the_slow_settings_lower_the_test_loss).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support import ROOT
from support.results import assert_final_accuracy_is_the_saved_states, assert_trained

from floral.experiment import load_config, read_experiment, resolve_config
from floral.run import run_experiment


def _mlp(hidden: int, rounds: int, clients_per_round: float, batch_size: int = 32,
         router_lr: float = 0.1) -> dict:
    """Model, training and evaluation of a shrunk image setting: an MLP, lr 0.1, one
    evaluation at the end."""
    return {
        "model": {"name": "mlp", "hidden": [hidden]},
        "train": {"rounds": rounds, "clients_per_round": clients_per_round,
                  "batch_size": batch_size, "lr": 0.1, "router_lr": router_lr},
        "engine": {"eval_every": rounds},
    }


def _task(setting: dict, name: str, **task: object) -> dict:
    return {**setting, "name": name, "task": {"num_clusters": 4, **task}}


DIGITS = _mlp(64, rounds=40, clients_per_round=0.5, batch_size=16, router_lr=1.0)
LABEL_SHIFT = _task(DIGITS, "digits-label-shift", dataset="digits", shift="label-shift",
                    num_clients=20)
ROTATE = _task(DIGITS, "digits-rotate", dataset="digits", shift="rotate", num_clients=20)
# The MNIST-5k "5%" settings: real MNIST images, ~10 training images per client.
MNIST5K_ROTATE = _task(_mlp(200, rounds=150, clients_per_round=0.25),
                       "mnist5k-rotate-5pct-short", dataset="mnist5k", shift="rotate",
                       num_clients=40, test_fraction=0.4, data_fraction=0.14)
# The EM router needs many clients per adaptor to find the clusters from 10 images each.
MNIST5K_LABEL_SHIFT = _task(_mlp(200, rounds=150, clients_per_round=0.1),
                            "mnist5k-label-shift-5pct-short", dataset="mnist5k",
                            shift="label-shift", num_clients=150, test_fraction=0.4,
                            data_fraction=0.5)
# Fashion-MNIST in the paper's MNIST setting, shrunk: 40 clients x 20 images, 60 rounds.
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not FMNIST_DIR.exists(), reason="apt-get install dataset-fashion-mnist"
)


def _fmnist(shift: str) -> dict:
    return _task(_mlp(200, rounds=60, clients_per_round=0.25), f"fmnist-{shift}-short",
                 dataset="fashion-mnist", shift=shift, num_clients=40, data_fraction=0.1)


# Its 5% setting: 40 clients x 10 images, 150 rounds.
FMNIST_ROTATE_5PCT = _task(_mlp(200, rounds=150, clients_per_round=0.25),
                           "fmnist-rotate-5pct-short", dataset="fashion-mnist", shift="rotate",
                           num_clients=40, data_fraction=400 / 60000)


LINEAR = {
    "name": "synthetic-linear",
    "task": {"dataset": "synthetic-linear", "shift": "none", "num_clients": 10,
             "num_clusters": 2},
    "model": {"name": "linear"},
    "train": {"rounds": 150, "clients_per_round": 1.0, "batch_size": 4, "lr": 0.1,
              "router_lr": 0.1},
    "engine": {"eval_every": 150},
}


def _final(base: dict, method: str, out: Path, seed: int = 0) -> tuple[float, float]:
    """(headline metric, router ARI or NaN) at the last round."""
    config = resolve_config({**base, "method": {"name": method}, "seed": seed})
    summary = run_experiment(config, out / f"{method}-{seed}")
    return summary.final[summary.metric], summary.final.get("router_ari", np.nan)


@pytest.mark.slow
def test_label_shift_personalization_is_the_whole_game(tmp_path):
    fedavg, _ = _final(LABEL_SHIFT, "fedavg", tmp_path)
    local, _ = _final(LABEL_SHIFT, "local-adaptor", tmp_path)
    oracle, _ = _final(LABEL_SHIFT, "floral-oracle", tmp_path)
    assert local >= fedavg + 20 and oracle >= fedavg + 30, (fedavg, local, oracle)


@pytest.mark.slow
def test_label_shift_em_router_finds_the_clusters_and_matches_the_oracle(tmp_path):
    paper, paper_ari = _final(LABEL_SHIFT, "floral", tmp_path)
    em, em_ari = _final(LABEL_SHIFT, "floral-em", tmp_path)
    oracle, _ = _final(LABEL_SHIFT, "floral-oracle", tmp_path)
    assert em_ari == 1.0 and em_ari > paper_ari, (em_ari, paper_ari)
    assert em >= paper and em >= oracle - 2, (em, paper, oracle)


@pytest.mark.slow
def test_rotate_every_method_learns_and_the_em_router_finds_the_rotations(tmp_path):
    fedavg, _ = _final(ROTATE, "fedavg", tmp_path)
    em, em_ari = _final(ROTATE, "floral-em", tmp_path)
    assert em_ari >= 0.9 and em >= fedavg - 2, (em, em_ari, fedavg)


@pytest.mark.slow
def test_synthetic_linear_mixture_beats_one_model_and_em_finds_both_clusters(tmp_path):
    fedavg, _ = _final(LINEAR, "fedavg", tmp_path)
    oracle, _ = _final(LINEAR, "floral-oracle", tmp_path)
    em, em_ari = _final(LINEAR, "floral-em", tmp_path)
    assert em_ari == 1.0
    assert oracle * 10 <= fedavg and em * 10 <= fedavg, (fedavg, oracle, em)


# The paper's synthetic MLP as configs/synthetic-mlp.toml has it (clients batched), 200 rounds.
_MLP_CONFIG = read_experiment(ROOT / "configs" / "synthetic-mlp.toml")
SYNTHETIC_MLP = {**_MLP_CONFIG, "train": {**_MLP_CONFIG["train"], "rounds": 200},
                 "engine": {**_MLP_CONFIG["engine"], "eval_every": 200}}


@pytest.mark.slow
def test_synthetic_mlp_one_model_then_private_adaptors_then_the_mixture(tmp_path):
    # The table's order (MSE): FedAvg 0.78 >> local adaptor 0.035 > FLoRAL 0.0049, ARI 1.00.
    fedavg, _ = _final(SYNTHETIC_MLP, "fedavg", tmp_path)
    local, _ = _final(SYNTHETIC_MLP, "local-adaptor", tmp_path)
    floral, floral_ari = _final(SYNTHETIC_MLP, "floral", tmp_path)
    assert floral_ari == 1.0
    assert fedavg >= 5 * local and floral <= 0.8 * local, (fedavg, local, floral)


@pytest.mark.slow
def test_mnist5k_rotate_5pct_sharing_beats_local_and_the_oracle_mixture_beats_one_model(
    tmp_path,
):
    # The paper's MNIST rot 5% column: FedAvg 78.2 > local adaptor 47.4; FLoRAL oracle 87.3.
    local, _ = _final(MNIST5K_ROTATE, "local-adaptor", tmp_path)
    fedavg, _ = _final(MNIST5K_ROTATE, "fedavg", tmp_path)
    oracle, _ = _final(MNIST5K_ROTATE, "floral-oracle", tmp_path)
    assert oracle >= fedavg + 4 and fedavg >= local + 4, (oracle, fedavg, local)


@pytest.mark.slow
def test_mnist5k_label_shift_5pct_em_router_finds_the_clusters_the_paper_router_misses(
    tmp_path,
):
    fedavg, _ = _final(MNIST5K_LABEL_SHIFT, "fedavg", tmp_path)
    paper, _ = _final(MNIST5K_LABEL_SHIFT, "floral", tmp_path)
    em, em_ari = _final(MNIST5K_LABEL_SHIFT, "floral-em", tmp_path)
    assert em_ari >= 0.9 and em >= paper + 30 and em >= fedavg + 30, (em, em_ari, paper, fedavg)


@pytest.mark.slow
def test_mnist5k_rotate_5pct_rank_warmup_finds_rotations_the_rank_1pct_em_router_misses(
    tmp_path,
):
    # docs/results.md: at rank 1% the E-step cannot tell the rotations apart from a random
    # start (ARI ~0.3 at full size); a rank-10% warm-up finds them, then restarts at 1%.
    plain, plain_ari = _final(MNIST5K_ROTATE, "floral-em", tmp_path)
    warm_config = resolve_config({**MNIST5K_ROTATE, "method": {
        "name": "floral-em", "warmup_rank": 0.1, "warmup_rounds": 75}})
    summary = run_experiment(warm_config, tmp_path / "warmup")
    warm, warm_ari = summary.final["accuracy"], summary.final["router_ari"]
    assert warm_ari >= plain_ari + 0.3 and warm >= plain + 4, (warm, warm_ari, plain, plain_ari)


@pytest.mark.slow
@needs_fmnist
def test_fmnist_label_shift_em_router_matches_the_oracle_and_sharing_beats_local(tmp_path):
    task = _fmnist("label-shift")
    fedavg, _ = _final(task, "fedavg", tmp_path)
    local, _ = _final(task, "local-adaptor", tmp_path)
    oracle, _ = _final(task, "floral-oracle", tmp_path)
    em, em_ari = _final(task, "floral-em", tmp_path)
    assert em_ari >= 0.9 and em >= oracle - 2, (em, em_ari, oracle)
    assert oracle >= local + 3 and local >= fedavg + 30, (oracle, local, fedavg)


@pytest.mark.slow
@needs_fmnist
def test_fmnist_rotate_em_router_finds_the_rotations_and_beats_one_model(tmp_path):
    task = _fmnist("rotate")
    fedavg, _ = _final(task, "fedavg", tmp_path)
    oracle, _ = _final(task, "floral-oracle", tmp_path)
    em, em_ari = _final(task, "floral-em", tmp_path)
    assert em_ari >= 0.9 and em >= oracle - 2, (em, em_ari, oracle)
    assert oracle >= fedavg + 3, (oracle, fedavg)


@pytest.mark.slow
@needs_fmnist
def test_fmnist_rotate_5pct_oracle_mixtures_then_one_model_then_local(tmp_path):
    # The table's order: Ensemble ✓ 79.5 > FLoRAL(1%) ✓ 78.0 > FedAvg 74.4 > local 54.0.
    local, _ = _final(FMNIST_ROTATE_5PCT, "local-adaptor", tmp_path)
    fedavg, _ = _final(FMNIST_ROTATE_5PCT, "fedavg", tmp_path)
    oracle, _ = _final(FMNIST_ROTATE_5PCT, "floral-oracle", tmp_path)
    ensemble, _ = _final(FMNIST_ROTATE_5PCT, "ensemble-oracle", tmp_path)
    assert ensemble >= oracle + 1 and oracle >= fedavg + 4 and fedavg >= local + 10, (
        ensemble, oracle, fedavg, local)


# -- the slow tests' short versions -------------------------------------------------------------
# Every (setting, method) pair the slow tests above run, 4 rounds long instead of 40-200: each
# still runs in the default test command and must lower the test loss from its round-0 value.
SHORT_ROUNDS = 4
WARMUP = {"name": "floral-em", "warmup_rank": 0.1, "warmup_rounds": 2}
SLOW_SETTINGS = [
    ("digits-label-shift", LABEL_SHIFT,
     ["fedavg", "local-adaptor", "floral-oracle", "floral", "floral-em"], ()),
    ("digits-rotate", ROTATE, ["fedavg", "floral-em"], ()),
    ("synthetic-linear", LINEAR, ["fedavg", "floral-oracle", "floral-em"], ()),
    ("synthetic-mlp", SYNTHETIC_MLP, ["fedavg", "local-adaptor", "floral"], ()),
    ("mnist5k-rotate-5pct", MNIST5K_ROTATE,
     ["local-adaptor", "fedavg", "floral-oracle", "floral-em", WARMUP], ()),
    ("mnist5k-label-shift-5pct", MNIST5K_LABEL_SHIFT, ["fedavg", "floral", "floral-em"], ()),
    ("fmnist-label-shift", _fmnist("label-shift"),
     ["fedavg", "local-adaptor", "floral-oracle", "floral-em"], needs_fmnist),
    ("fmnist-rotate", _fmnist("rotate"), ["fedavg", "floral-oracle", "floral-em"], needs_fmnist),
    ("fmnist-rotate-5pct", FMNIST_ROTATE_5PCT,
     ["local-adaptor", "fedavg", "floral-oracle", "ensemble-oracle"], needs_fmnist),
]
SHORT_RUNS = [
    pytest.param(task, {"name": m} if isinstance(m, str) else m, marks=marks,
                 id=f"{name}-{m if isinstance(m, str) else 'floral-em-warmup'}")
    for name, task, methods, marks in SLOW_SETTINGS
    for m in methods
]


@pytest.mark.parametrize(("task", "method"), SHORT_RUNS)
def test_short_runs_of_the_slow_settings_lower_the_test_loss(tmp_path, task, method):
    short = {**task, "method": method, "train": {**task["train"], "rounds": SHORT_ROUNDS},
             "engine": {**task["engine"], "eval_every": SHORT_ROUNDS}}
    summary = run_experiment(resolve_config(short), tmp_path)
    assert [row["round"] for row in summary.history] == [0, SHORT_ROUNDS]
    assert summary.final["loss"] < summary.history[0]["loss"], summary.history


# -- the CIFAR experiment files, on tiny files in the CIFAR binary format --------------------
def _write_cifar(folder: Path, names: list[str], label_bytes: int, classes: int) -> None:
    """`per_file` records of label byte(s) + 3072 pixel bytes, every class present."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    per_file = 2 * classes
    for name in names:
        fine = np.arange(per_file, dtype=np.uint8) % classes
        labels = np.stack([fine // 5, fine], axis=1) if label_bytes == 2 else fine[:, None]
        pixels = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        np.concatenate([labels.astype(np.uint8), pixels], axis=1).tofile(folder / name)


@pytest.mark.parametrize("method", ["floral", "floral-em"])
def test_cifar100_config_runs_on_tiny_binary_files(tmp_path, method):
    _write_cifar(tmp_path / "c100", ["train.bin", "test.bin"], label_bytes=2, classes=100)
    config = load_config(
        ROOT / "configs" / "cifar100-label-set.toml",
        [f"task.data_dir={tmp_path / 'c100'}", "task.num_clients=10", "train.rounds=1",
         "train.clients_per_round=0.2", f"method.name={method}", "engine.eval_every=1"],
    )
    summary = run_experiment(config, tmp_path / "out")
    assert summary.rounds == 1 and "router_ari" in summary.final
    assert_trained(summary)
    assert_final_accuracy_is_the_saved_states(config, summary)


@pytest.mark.parametrize("name", ["cifar10-rotate", "cifar10-label-shift-5pct"])
def test_cifar10_configs_run_on_tiny_binary_files(tmp_path, name):
    files = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    _write_cifar(tmp_path / "c10", files, label_bytes=1, classes=10)
    config = load_config(
        ROOT / "configs" / f"{name}.toml",
        [f"task.data_dir={tmp_path / 'c10'}", "task.num_clients=4", "train.rounds=1",
         "method.name=floral-em", "engine.eval_every=1"],
    )
    summary = run_experiment(config, tmp_path / "out")
    assert summary.rounds == 1
    assert_trained(summary)
    assert_final_accuracy_is_the_saved_states(config, summary)
