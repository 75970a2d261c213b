"""Flower's secure aggregation (SecAgg+) with floral's methods.

A method whose server step needs only the sum of the uploads runs under Flower's own
`secaggplus_mod` and ends with the plain run's numbers, to within SecAgg+'s quantization
(22+ bits over +-`flower.secagg-clip`); the server never holds one client's upload. Methods
and settings that need each upload stop before any round with one line naming the key.
"""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("flwr")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from support.flower import run_loopback, tiny_experiment  # noqa: E402

from floral.engines.flower.options import FlowerOptions, options_from_run_config  # noqa: E402
from floral.engines.flower.records import UPLOAD  # noqa: E402
from floral.errors import ConfigError, RoundFailedError  # noqa: E402
from floral.experiment import resolve_config  # noqa: E402
from floral.methods import get_method, method_names  # noqa: E402
from floral.run import run_experiment  # noqa: E402

SECURE = FlowerOptions(round_timeout=30.0, node_timeout=1.0, poll_interval=0.001, secagg=True,
                       secagg_clip=256.0)


def _globals(path):
    return {k: v for k, v in load_file(path).items() if k.startswith("global/")}


@pytest.mark.parametrize("method", ["fedavg", "floral"])
def test_secure_aggregation_ends_with_the_plain_runs_numbers(tmp_path, method):
    config = resolve_config(tiny_experiment(method))
    plain = run_experiment(config, tmp_path / "local")
    secure, grid = run_loopback(config, tmp_path / "secure", options=SECURE)

    for key, value in plain.final.items():
        if key.startswith(("seconds", "bytes")):
            continue
        assert secure.final[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    expected = _globals(tmp_path / "local" / "state.safetensors")
    got = _globals(tmp_path / "secure" / "state.safetensors")
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5)
    # Not bitwise: SecAgg+ rounded the uploads (stochastically), so something differs.
    assert any(not torch.equal(got[n], expected[n]) for n in expected)

    # No reply carried an upload in clear: masked integer vectors and settings only.
    replies = [m for m in grid.traffic if m.metadata.reply_to_message_id]
    assert not [m for m in replies if UPLOAD in m.content]
    masked = [m for m in replies if "secaggplus_configs" in m.content.config_records
              and "masked_params" in m.content.config_records["secaggplus_configs"]]
    assert len(masked) == 3 * config.train.rounds  # 3 of 4 clients per round
    for reply in replies:
        for record in reply.content.array_records.values():
            assert not [name for name in record if "router" in name]
            assert not len(record) or reply.content.config_records.get("floral.node")


@pytest.mark.parametrize(
    ("method", "settings", "message"),
    [
        ("flora", ["method.rank_tiers=[1, 2]", "method.rank=2"],
         "flower.secagg: flora reads each client's upload on its own"),
        ("hetlora", ["method.ranks=[1, 2, 4, 4]", "method.rank=4"],
         "flower.secagg: hetlora reads each client's upload on its own"),
        ("fedavg", ["train.aggregation=median"], "flower.secagg: train.aggregation = 'median'"),
        ("floral", ["train.dp_clip=0.5", "train.dp_noise=1.0"],
         "flower.secagg: central differential privacy"),
        ("fedavg", ["comm.upload=topk:0.1"], "flower.secagg: comm.upload = 'topk:0.1'"),
        ("fedavg", ["train.clients_per_round=0.25"], "flower.secagg: a sum hides nothing"),
    ],
    ids=["flora", "hetlora", "robust", "central-dp", "sparse-upload", "one-client"],
)
def test_what_secure_aggregation_cannot_do_stops_before_any_round(
    tmp_path, method, settings, message
):
    config = resolve_config(tiny_experiment(method), settings)
    with pytest.raises(ConfigError, match=message) as error:
        run_loopback(config, tmp_path / "out", options=SECURE)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()  # nothing ran, nothing written


def test_local_differential_privacy_works_under_secure_aggregation(tmp_path):
    # Clipped on the client, without noise (secret noise differs run to run), every client.
    config = resolve_config(tiny_experiment("fedavg"), [
        "train.dp_clip=0.5", "train.dp_mode=local", "train.clients_per_round=1.0"])
    plain = run_experiment(config, tmp_path / "local")
    secure, _ = run_loopback(config, tmp_path / "secure", options=SECURE)
    assert secure.final["mse"] == pytest.approx(plain.final["mse"], rel=1e-4)


def test_an_upload_beyond_the_clipping_range_is_an_error_not_clipped(tmp_path, caplog):
    config = resolve_config(tiny_experiment("fedavg"))
    tight = FlowerOptions(round_timeout=30.0, node_timeout=1.0, poll_interval=0.001,
                          secagg=True, secagg_clip=1.0)
    # Every client's upload is beyond the range: the round applies none, and the run fails.
    with caplog.at_level("WARNING", logger="flwr.floral"), pytest.raises(
            RoundFailedError, match=r"^round 1: 0 of 3 updates applied"):
        run_loopback(config, tmp_path / "out", options=tight)
    lines = [r.getMessage() for r in caplog.records]
    clipped = [line for line in lines if "flower.secagg-clip: client" in line]
    assert clipped and all("beyond +-1; raise flower.secagg-clip" in line for line in clipped)


def test_run_config_keys():
    options = options_from_run_config({"flower.secagg": True, "flower.secagg-clip": 100.0})
    assert options.secagg and options.secagg_clip == 100.0
    with pytest.raises(ConfigError, match="flower.secagg: expected true or false"):
        options_from_run_config({"flower.secagg": "yes"})
    with pytest.raises(ConfigError, match="flower.secagg-clip: expected a positive number"):
        options_from_run_config({"flower.secagg-clip": -1.0})


@pytest.mark.parametrize("method", [m for m in method_names() if get_method(m).secure_sum])
def test_every_method_that_declares_a_secure_sum_runs_under_secure_aggregation(tmp_path, method):
    config = resolve_config(tiny_experiment(method))
    plain = run_experiment(config, tmp_path / "local")
    roomy = dataclasses.replace(SECURE, secagg_clip=4096.0)  # FLoRAL-EM uploads reach ~600
    secure, _ = run_loopback(config, tmp_path / "secure", options=roomy)
    assert secure.final[plain.metric] == pytest.approx(plain.final[plain.metric], rel=1e-3)
