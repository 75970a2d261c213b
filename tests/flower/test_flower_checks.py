"""What needs no Flower: upload checks (`Method.check_upload`), run-config mapping, the extra.

These run everywhere; the engine itself is tested in test_flower_engine.py (and on Ray and a
real SuperLink in test_flower_simulation.py and test_flower_deployment.py).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from support import ROOT

from floral.cli import main
from floral.config import tomllib
from floral.engines.flower import experiment_from_run_config, options_from_run_config
from floral.errors import ConfigError
from floral.experiment import build_engine, resolve_config
from floral.methods import get_method
from floral.methods.base import ServerState
from floral.methods.checks import aggregation_problems, value_problems

APP = ROOT / "examples" / "flower-app" / "pyproject.toml"
TINY = {
    "task": {"dataset": "synthetic-mlp", "shift": "none", "num_clients": 4, "num_clusters": 2,
             "samples_per_client": 20},
    "model": {"name": "mlp", "hidden": [8]},
    "method": {"name": "floral"},
    "train": {"rounds": 1, "batch_size": 8},
}


@pytest.fixture(scope="module")
def real_upload() -> tuple[ServerState, dict]:
    """(server state, upload) of one real FLoRAL client step."""
    engine, _ = build_engine(resolve_config(TINY))
    update = engine.method.client_step(
        engine.slots, engine.local.job(0, engine.global_state, round_=1)
    )
    return engine.state, update.upload


def check_upload(state: ServerState, upload: dict) -> list[str]:
    return get_method("floral").check_upload(state, upload)


def test_a_real_upload_passes(real_upload):
    state, upload = real_upload
    assert check_upload(state, upload) == []


def _first_delta(upload: dict) -> str:
    return next(name for name in upload if not name.endswith("::weight"))


@pytest.mark.parametrize(
    ("fault", "phrase"),
    [
        ("wrong shape", "has shape (3, 3), expected"),
        ("wrong dtype", "has dtype torch.float64, expected torch.float32"),
        ("NaN", "has NaN or infinite values"),
        ("inf weight", "has NaN or infinite values"),
        ("negative weight", "has negative weights"),
        ("weight shape", "not broadcastable to"),
        ("missing key", "missing '"),
        ("unexpected key", "unexpected 'floral_router.logits'"),
    ],
)
def test_each_fault_is_named(real_upload, fault, phrase):
    state, upload = real_upload
    bad = dict(upload)
    name = _first_delta(upload)
    weight = name + "::weight"
    if fault == "wrong shape":
        bad[name] = torch.zeros(3, 3)
    elif fault == "wrong dtype":
        bad[name] = upload[name].double()
    elif fault == "NaN":
        bad[name] = upload[name].clone().fill_(float("nan"))
    elif fault == "inf weight":
        bad[weight] = torch.tensor(float("inf"))
    elif fault == "negative weight":
        bad[weight] = -upload[weight]
    elif fault == "weight shape":
        bad[weight] = torch.ones(7, 7)
    elif fault == "missing key":
        del bad[name]
    elif fault == "unexpected key":
        bad["floral_router.logits"] = torch.zeros(2)  # a private tensor must never be accepted
    problems = check_upload(state, bad)
    assert problems and any(phrase in p for p in problems), problems


def test_a_method_with_its_own_aggregation_judges_off_contract_uploads(real_upload):
    state, upload = real_upload
    name = _first_delta(upload)
    fedavg = get_method("fedavg")
    off_contract = {**upload, name: torch.zeros(1)}  # would broadcast in a plain sum
    # The contract's rule for methods that aggregate by the base rule: exact shapes.
    assert fedavg.check_upload(state, off_contract) != []

    class OwnAggregation(type(fedavg)):  # declares: judge my uploads by my aggregation
        def check_upload(self, state, upload):
            return value_problems(upload) or aggregation_problems(self, state, upload)

    class Padding(OwnAggregation):  # accepts any delta it can pad to the global shape
        def server_update(self, state, uploads, optimizer):
            padded = [{**u, name: u[name].expand_as(state.global_state[name])} for u in uploads]
            return super().server_update(state, padded, optimizer)

    class Refusing(OwnAggregation):
        def server_update(self, state, uploads, optimizer):
            raise ValueError("rank 9 is more than the global rank 4")

    assert Padding().check_upload(state, off_contract) == []
    refused = Refusing().check_upload(state, off_contract)
    assert refused == [
        "the method's aggregation refuses it (ValueError: rank 9 is more than the global rank 4)"
    ]
    nan = {**off_contract, name: torch.full((1,), float("nan"))}  # values are checked first
    assert "NaN" in Padding().check_upload(state, nan)[0]


def _app_run_config() -> dict:
    app = tomllib.loads(APP.read_text())["tool"]["flwr"]["app"]["config"]
    flat: dict = {}

    def walk(table: dict, prefix: str) -> None:  # Flower flattens nested tables with dots
        for key, value in table.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[prefix + key] = value

    walk(app, "")
    return flat


def test_the_example_apps_run_config_is_a_floral_experiment():
    run_config = _app_run_config()
    data, overrides = experiment_from_run_config(run_config)
    config = resolve_config(data, overrides)
    assert config.task.num_clients == run_config["task.num_clients"]
    assert config.model.hidden == [20]  # a list, written as a string in the run config
    assert config.method_name == run_config["method.name"]
    options = options_from_run_config(run_config)
    assert options.round_timeout == run_config["flower.round-timeout"]


def test_run_config_overrides_reach_method_options():
    run_config = {**_app_run_config(), "overrides": "method.rank=2 method.temperature=0.5"}
    config = resolve_config(*experiment_from_run_config(run_config))
    assert config.method["rank"] == 2 and config.method["temperature"] == 0.5


@pytest.mark.parametrize(
    ("run_config", "message"),
    [
        ({"flower.round-time": 5.0}, "flower.round-time: unknown key"),
        ({"flower.node-timeout": -1.0}, "expected a positive number of seconds"),
        ({"flower.resume": "yes"}, 'flower.resume: expected true, false or "auto"'),
        ({"overrides": "rank"}, "overrides: expected key=value"),
        ({"train.nonsense": 1}, "train.nonsense: unknown key"),
    ],
)
def test_bad_run_configs_are_one_line_errors(run_config, message):
    with pytest.raises(ConfigError, match=message):
        options_from_run_config(run_config)
        resolve_config(*experiment_from_run_config({**_app_run_config(), **run_config}))


def test_without_flower_the_flower_engine_names_the_extra(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "flwr" else real(name, *a)
    )
    experiment = tmp_path / "tiny.toml"
    experiment.write_text('[task]\ndataset = "synthetic-mlp"\nshift = "none"\nnum_clients = 4\n')
    code = main(["run", str(experiment), "--engine", "flower", "--quiet", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == "floral: error: engine 'flower' needs Flower: pip install 'floral-lora[flower]'"
    assert not (tmp_path / "config.toml").exists()  # stopped before any output
