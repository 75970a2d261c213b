"""Engine parity on a real Flower simulation (ServerApp in this process, clients in Ray actors).

The same experiment and seed on the local engine and on Flower must end with the same metrics
and global tensors. Tolerance: 1e-6 relative. Both engines run the same float operations in the
same order (same model from the seed, same batches and seeds per client, uploads summed in
client order, evaluation sums added in client order); the only thing that may differ is the
thread count of BLAS inside the Ray workers, which could reorder the additions inside a matmul.
Measured difference: 0 (bitwise equal) for all three methods.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from support.flower import tiny_experiment  # noqa: E402

from floral.cli import main  # noqa: E402
from floral.engines.flower.options import FlowerOptions  # noqa: E402
from floral.experiment import resolve_config  # noqa: E402
from floral.flower_app import simulate  # noqa: E402
from floral.run import run_experiment  # noqa: E402

TOLERANCE = 1e-6
BOUNDED = FlowerOptions(round_timeout=300.0, node_timeout=60.0)


# Each simulation starts Ray (10-50 s): one method in the default tests, the others `-m slow`.
# test_flower_engine.py runs every method through the same ServerApp and ClientApp in-process.
@pytest.mark.parametrize(
    "method",
    [pytest.param("fedavg", marks=pytest.mark.slow), "floral",
     pytest.param("local-adaptor", marks=pytest.mark.slow)],
)
def test_flower_simulation_matches_the_local_engine(tmp_path, method):
    config = resolve_config(tiny_experiment(method), ["engine.name=flower"])
    local = run_experiment(resolve_config(tiny_experiment(method)), tmp_path / "local")
    flower = simulate(config, tmp_path / "flower", options=BOUNDED)

    assert flower.final.keys() == local.final.keys()
    for key, value in local.final.items():
        assert math.isclose(flower.final[key], value, rel_tol=TOLERANCE, abs_tol=TOLERANCE), key
    for name in ("config.toml", "metrics.csv", "summary.json", "state.safetensors"):
        assert (tmp_path / "flower" / name).exists(), name
    expected = load_file(tmp_path / "local" / "state.safetensors")
    got = load_file(tmp_path / "flower" / "state.safetensors")
    got.pop("flower/lineage")  # the run's name on the nodes, for resume
    assert not any(name.startswith("private/") for name in got)  # they stayed on the nodes
    assert got.keys() == {k for k in expected if not k.startswith("private/")}
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, expected[name], rtol=TOLERANCE, atol=TOLERANCE)


def test_floral_run_engine_flower_starts_a_simulation(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        "floral.flower_app.simulate",
        lambda config, out, **kwargs: calls.append((config, out)) or _fake_summary(out),
    )
    experiment = tmp_path / "tiny.toml"
    experiment.write_text('[task]\ndataset = "synthetic-mlp"\nshift = "none"\nnum_clients = 4\n')
    code = main(["run", str(experiment), "--engine", "flower", "--quiet", "--out", str(tmp_path)])
    assert code == 0
    assert calls[0][0].engine.name == "flower" and calls[0][1] == tmp_path


def _fake_summary(out):
    from floral.experiment import RunSummary

    return RunSummary("tiny", "floral", 0, 1, "mse", {"mse": 1.0}, 0.0, 0.0, 0, 0, str(out))
