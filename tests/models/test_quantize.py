"""A frozen base in 8 or 4 bits (`model.quantize`, bitsandbytes, here on the CPU): which layers
are quantized, that they compute what the full-precision layers do to quantization error, that
a federated run trains the adaptors over them, and one-line errors where it cannot work."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from floral.errors import ConfigError
from floral.experiment import build_engine, build_setup, resolve_config

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("transformers")

from support.data import write_rda_folder  # noqa: E402


def experiment(tmp_path, quantize: str, method=None, **extra):
    data = {
        "name": "quantized",
        "task": {"dataset": "austen", "shift": "none", "num_clients": 2, "num_clusters": 2,
                 "tokenizer": "bytes", "block_size": 16, "samples_per_client": 6,
                 "data_dir": str(write_rda_folder(tmp_path / "rda"))},
        "model": {"name": "tiny-llama", "quantize": quantize},
        "method": method or {"name": "fedit", "rank": 2, "include": ["*.q_proj", "*.v_proj"]},
        "train": {"rounds": 2, "clients_per_round": 1.0, "batch_size": 3, "lr": 0.05},
        "engine": {"eval_every": 1},
    }
    for table, values in extra.items():
        data[table] = {**data[table], **values}
    return resolve_config(data)


@pytest.mark.parametrize(("mode", "layer_type", "tolerance"), [
    ("int8", "Linear8bitLt", 0.05), ("nf4", "Linear4bit", 0.3),
])
def test_frozen_linear_layers_are_quantized_and_compute_close_to_full_precision(
        tmp_path, mode, layer_type, tolerance):
    _, task, full = build_setup(experiment(tmp_path, "none"))
    _, _, small = build_setup(experiment(tmp_path, mode))
    kinds = {name: type(m).__name__ for name, m in small.named_modules()}
    assert kinds["lm.model.layers.0.mlp.down_proj"] == layer_type  # frozen, 64 -> 32 wide
    assert kinds["lm.lm_head"] == "Linear"  # tied to the embedding: left alone
    # 32 -> 32 and 32 -> 16 wide: bitsandbytes packs 4 bits on a CPU only for inputs in blocks
    # of 64 and outputs in multiples of 32.
    four_bit_fits = "Linear" if mode == "nf4" else layer_type
    assert kinds["lm.model.layers.0.self_attn.q_proj.base"] == four_bit_fits  # adapted: its base
    assert kinds["lm.model.layers.0.self_attn.v_proj.base"] == four_bit_fits
    ids = task.clients[0].x_test[:2]
    with torch.no_grad():
        reference, quantized = full.eval()(ids), small.eval()(ids)
    error = (quantized - reference).norm() / reference.norm()
    assert 0 < error < tolerance, float(error)


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_a_run_over_a_quantized_base_trains_the_adaptors_only(tmp_path, mode):
    engine, _ = build_engine(experiment(tmp_path, mode))
    before = {n: t.clone() for n, t in engine.global_state.items()}
    for _ in range(2):
        engine.run_round()
    assert set(engine.global_state) == set(before)
    assert all(".lora_" in n and t.dtype is torch.float32 for n, t in engine.global_state.items())
    assert any(not torch.equal(before[n], engine.global_state[n]) for n in before)
    assert math.isfinite(engine.evaluate()["loss"])


def test_adapted_layer_over_a_quantized_base_adds_the_mixture_exactly():
    from floral.adapters import AdapterSpec, attach
    from floral.models.quantize import quantize_frozen

    torch.manual_seed(0)
    model = attach(nn.Sequential(nn.Linear(32, 16)), AdapterSpec(num_adaptors=2, rank=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_()
    for p in model[0].base.parameters():
        p.requires_grad_(False)
    quantize_frozen(model, {"0.base.weight", "0.base.bias"}, "int8", torch.float32)
    layer = model[0]
    x = torch.randn(5, 32)
    model.eval()
    with torch.no_grad():
        got = model(x)
        pi = layer.eval_mixture()
        a, b, bias = layer.lora_A, layer.lora_B, layer.lora_bias
        delta = sum(pi[c] * (x @ a[c].t() @ b[c] + bias[c]) for c in range(2))
        expected = layer.base(x) + layer.alpha * delta
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize(("override", "needle"), [
    ({"quantize": "int4"}, "model.quantize: unknown 'int4'"),
])
def test_unknown_mode_is_a_one_line_error(tmp_path, override, needle):
    with pytest.raises(ConfigError, match=needle):
        experiment(tmp_path, override["quantize"])


def test_a_method_that_trains_the_base_cannot_quantize_it(tmp_path):
    config = experiment(tmp_path, "nf4", method={"name": "fedavg"})
    with pytest.raises(ConfigError, match="'nf4': no linear layer to quantize: fedavg trains them"):
        build_setup(config)


def test_missing_bitsandbytes_names_the_extra(tmp_path, monkeypatch):
    import floral.models.quantize as quantize

    def missing(name):
        raise ImportError(name)

    monkeypatch.setattr(quantize.importlib, "import_module", missing)
    with pytest.raises(ConfigError, match=r"pip install 'floral-lora\[quantize\]'"):
        experiment(tmp_path, "int8")


def test_the_gradient_through_a_4_bit_layer_is_that_of_its_quantized_weight():
    from floral.models.quantize import quantize_frozen

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    quantize_frozen(model, {"0.weight", "0.bias"}, "nf4", torch.float32)
    layer = model[0]
    probes = torch.randn(256, 64)
    with torch.no_grad():  # the weight the layer really applies, from its outputs
        effective = torch.linalg.lstsq(probes, layer(probes) - layer.bias).solution.T
    x = torch.randn(5, 64, requires_grad=True)
    y = model(x)
    y.pow(2).sum().backward()
    expected = (2 * y.detach()) @ effective
    assert (x.grad - expected).norm() <= 1e-5 * expected.norm()
