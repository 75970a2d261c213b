"""On a CUDA GPU: the same runs as on the CPU, to float tolerance; every boundary on the CPU;
mixed precision, compilation and the batched engine there. Skipped without a GPU."""

from __future__ import annotations

import math

import pytest
import torch

from floral.experiment import build_engine, resolve_config
from floral.train.device import CPU

pytestmark = pytest.mark.cuda

BASE = {
    "name": "cuda",
    "seed": 2,
    "task": {"dataset": "synthetic-mlp", "shift": "none", "num_clients": 6, "num_clusters": 2,
             "samples_per_client": 32},
    "model": {"name": "mlp", "hidden": [16]},
    "method": {"name": "floral", "num_adaptors": 2},
    "train": {"rounds": 3, "clients_per_round": 1.0, "batch_size": 8, "lr": 0.05},
    "engine": {"eval_every": 1},
}


def run(device: str, method=None, **tables):
    data = {**BASE, "method": method or BASE["method"]}
    for table, values in tables.items():
        data[table] = {**data.get(table, {}), **values}
    data["engine"] = {**data["engine"], "device": device}
    engine, _ = build_engine(resolve_config(data))
    for _ in range(data["train"]["rounds"]):
        engine.run_round()
    return engine


@pytest.mark.parametrize("method", [{"name": "floral", "num_adaptors": 2},
                                    {"name": "fedit", "rank": 2},
                                    {"name": "local-adaptor", "rank": 2},
                                    {"name": "fdlora", "rank": 2},
                                    {"name": "floral-em", "num_adaptors": 2}])
def test_a_gpu_run_matches_the_cpu_run_and_keeps_its_boundaries_on_the_cpu(method):
    cpu, gpu = run("cpu", method), run("cuda", method)
    assert next(gpu.model.parameters()).device.type == "cuda"
    state = gpu.state_dict()
    assert all(t.device == CPU for t in state.values())
    assert all(t.device == CPU for p in gpu.private.values() for t in p.values())
    for name, value in cpu.global_state.items():
        assert torch.allclose(gpu.global_state[name], value, atol=1e-4, rtol=1e-3), name
    assert math.isclose(gpu.evaluate()["loss"], cpu.evaluate()["loss"], rel_tol=1e-3)


def test_seeded_gpu_runs_repeat():
    a, b = run("cuda"), run("cuda")
    assert all(torch.equal(a.global_state[n], b.global_state[n]) for n in a.global_state)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_on_the_gpu_trains_close_to_float32(dtype):
    fedit = {"name": "fedit", "rank": 2}
    full, half = run("cuda", fedit), run("cuda", fedit, model={"dtype": dtype})
    assert abs(half.evaluate()["loss"] - full.evaluate()["loss"]) < 0.05 * full.evaluate()["loss"]


def test_compiled_gpu_step_matches_eager():
    fedit = {"name": "fedit", "rank": 2}
    eager, compiled = run("cuda", fedit), run("cuda", fedit, engine={"compile": True})
    for name, value in eager.global_state.items():
        assert torch.allclose(compiled.global_state[name], value, atol=1e-4), name


def test_batched_clients_on_the_gpu_match_sequential():
    seq, batched = run("cuda"), run("cuda", engine={"batch_clients": 6})
    for name, value in seq.global_state.items():
        assert torch.allclose(batched.global_state[name], value, atol=1e-4), name


def test_a_language_model_on_the_gpu_with_adamw_and_bf16():
    pytest.importorskip("transformers")
    from floral.llm import build_causal_lm
    from floral.methods import get_method
    from floral.train.device import Placement
    from floral.train.loop import TrainConfig, build_optimizer, train_epochs
    from floral.train.objective import next_token_loss

    torch.manual_seed(0)
    method = get_method("floral", {"num_adaptors": 4, "rank": 4, "train_base": False,
                                   "include": ["*_proj"]})
    model = method.build_model(build_causal_lm("tiny-llama", 128), None).cuda()
    ids = torch.randint(0, 128, (8, 33))
    config = TrainConfig(optimizer="adamw", lr=1e-3, batch_size=4)
    optimizer = build_optimizer(method.param_groups(model, config), config)
    loss = train_epochs(model, optimizer, ids[:, :-1], ids[:, 1:], next_token_loss, batch_size=4,
                        epochs=2, generator=torch.Generator().manual_seed(0),
                        placement=Placement(torch.device("cuda"), torch.bfloat16))
    assert math.isfinite(loss)


@pytest.mark.parametrize("mode", ["central", "local"])
def test_differential_privacy_on_the_gpu_draws_the_cpu_runs_noise(mode):
    dp = {"dp_clip": 0.5, "dp_noise": 0.5, "dp_mode": mode}
    fedavg = {"name": "fedavg"}
    cpu, gpu = run("cpu", fedavg, train=dp), run("cuda", fedavg, train=dp)
    for name, value in cpu.global_state.items():
        assert torch.allclose(gpu.global_state[name], value, atol=1e-4, rtol=1e-3), name


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_a_quantized_base_trains_its_adaptors_on_the_gpu(tmp_path, mode):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("transformers")
    from support.data import write_rda_folder

    config = resolve_config({
        "task": {"dataset": "austen", "shift": "none", "num_clients": 2, "num_clusters": 2,
                 "tokenizer": "bytes", "block_size": 16, "samples_per_client": 6,
                 "data_dir": str(write_rda_folder(tmp_path / "rda"))},
        "model": {"name": "tiny-llama", "quantize": mode, "dtype": "bfloat16"},
        "method": {"name": "fedit", "rank": 2, "include": ["*.q_proj", "*.v_proj"]},
        "train": {"rounds": 2, "clients_per_round": 1.0, "batch_size": 3, "lr": 0.05},
        "engine": {"eval_every": 1, "device": "cuda"},
    })
    engine, _ = build_engine(config)
    before = {n: t.clone() for n, t in engine.global_state.items()}
    for _ in range(2):
        engine.run_round()
    assert any(not torch.equal(before[n], engine.global_state[n]) for n in before)
    assert math.isfinite(engine.evaluate()["loss"])
