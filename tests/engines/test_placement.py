"""Where a client step runs and how: devices, precision, compilation, threads, and the local
optimizer (AdamW, schedules, accumulation, clipping), checked against loops written by hand."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from floral.cli import main
from floral.data import ClientData
from floral.engines.config import EngineConfig
from floral.engines.local import LocalEngine
from floral.errors import ConfigError
from floral.experiment import build_engine, placement_of, resolve_config
from floral.methods import get_method
from floral.methods.base import ClientJob, Method
from floral.train.device import (
    CPU,
    Placement,
    cast_tensors,
    default_threads,
    resolve_device,
    seeded_rng,
)
from floral.train.loop import TrainConfig, round_lr_factor
from floral.train.objective import get_objective
from floral.train.state import OPTIMIZER_PREFIX, StateSlots

BASE = {
    "name": "placement",
    "seed": 1,
    "task": {"dataset": "synthetic-mlp", "shift": "none", "num_clients": 4, "num_clusters": 2,
             "samples_per_client": 24},
    "model": {"name": "mlp", "hidden": [8]},
    "method": {"name": "floral"},
    "train": {"rounds": 2, "clients_per_round": 1.0, "batch_size": 8, "lr": 0.05},
    "engine": {"eval_every": 1},
}


def config(**tables):
    data = {key: dict(value) if isinstance(value, dict) else value for key, value in BASE.items()}
    for table, values in tables.items():
        data[table] = {**data.get(table, {}), **values}
    return resolve_config(data)


def run(cfg, rounds: int | None = None) -> LocalEngine:
    engine, _ = build_engine(cfg)
    for _ in range(rounds or cfg.train.rounds):
        engine.run_round()
    return engine


# -- settings ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("override", "needle"), [
    ("engine.device=tpu", "engine.device: unknown 'tpu'"),
    ("engine.device=gpu0", "engine.device: unknown 'gpu0'"),
    ("engine.threads=-1", "engine.threads: must be >= 0"),
    ("model.dtype=float64", "model.dtype: unknown 'float64'"),
    ("train.optimizer=adam", "train.optimizer: unknown 'adam'"),
    ("train.lr_schedule=step", "train.lr_schedule: unknown 'step'"),
    ("train.warmup_rounds=6", "train.warmup_rounds: must be in [0, train.rounds)"),
    ("train.grad_accumulation=0", "train.grad_accumulation: must be at least 1"),
    ("train.max_grad_norm=-1.0", "train.max_grad_norm: must be >= 0"),
    ("train.betas=[0.9, 1.5]", "train.betas: two numbers in [0, 1)"),
    ("train.gradient_checkpointing=true", "train.gradient_checkpointing: only for language"),
])
def test_bad_placement_settings_stop_before_any_work(tmp_path, capsys, override, needle):
    path = tmp_path / "tiny.toml"
    path.write_text(
        '[task]\ndataset = "synthetic-mlp"\nshift = "none"\nnum_clients = 4\n'
        'samples_per_client = 8\n[model]\nname = "mlp"\nhidden = [4]\n[train]\nrounds = 6\n'
    )
    out = tmp_path / "out"
    assert main(["run", str(path), "--quiet", "--out", str(out), "--set", override]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and needle in error, error
    assert not (out / "metrics.csv").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_where_there_is_none_is_a_one_line_error():
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=f"engine.device: '{spec}' asked, but torch sees no"):
            resolve_device(spec)
    assert resolve_device("auto") == CPU


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an Apple GPU")
def test_mps_where_there_is_none_is_a_one_line_error():
    with pytest.raises(ConfigError, match="engine.device: 'mps' asked, but this machine has no"):
        resolve_device("mps")


def test_a_node_may_choose_its_own_device():
    cfg = config(engine={"device": "cpu"})
    assert placement_of(cfg, "cpu").device == CPU
    with pytest.raises(ConfigError, match="^device: unknown 'tpu'"):
        placement_of(cfg, "tpu")


def test_the_cpu_device_gives_the_default_engines_numbers_exactly():
    auto, cpu = run(config()), run(config(engine={"device": "cpu"}))
    assert auto.global_state.keys() == cpu.global_state.keys()
    assert all(torch.equal(auto.global_state[n], cpu.global_state[n]) for n in auto.global_state)


# -- what crosses a boundary is on the CPU, whatever the device ---------------------------------

def test_uploads_private_state_and_checkpoints_leave_the_step_on_the_cpu():
    engine = run(config(engine={"device": "cpu"}), rounds=1)
    state = engine.state_dict()
    assert state and all(t.device == CPU for t in state.values())
    update = _one_step(get_method("local-adaptor", {"rank": 2}), TrainConfig(optimizer="adamw"))
    on_cpu = update.on_cpu()
    assert all(t.device == CPU for t in {**on_cpu.upload, **on_cpu.private}.values())
    # A copy on the way out: a later step on the scratch model cannot change what was sent.
    assert all(a is not b or a.device == CPU for a, b in zip(update.private.values(),
                                                           on_cpu.private.values()))


def test_seeded_rng_restores_the_generators_and_repeats_draws():
    before = torch.random.get_rng_state()
    with seeded_rng(5):
        first = torch.rand(3)
    with seeded_rng(5):
        second = torch.rand(3)
    assert torch.equal(first, second)
    assert torch.equal(torch.random.get_rng_state(), before)


# -- precision -----------------------------------------------------------------------------------

def test_bfloat16_stores_only_the_frozen_base_low_and_trains_close_to_float32():
    fedit = {"name": "fedit", "rank": 2}
    full = run(config(method=fedit))
    half = run(config(method=fedit, model={"dtype": "bfloat16"}))
    roles = half.method.roles(half.model)
    dtypes = {name: t.dtype for name, t in half.model.state_dict().items()}
    frozen = [n for n, r in roles.items() if r.value == "frozen"]
    assert frozen and all(dtypes[n] is torch.bfloat16 for n in frozen)
    assert all(dtypes[n] is torch.float32 for n in half.global_state)
    assert all(t.dtype is torch.float32 for t in half.global_state.values())
    moved = [n for n in full.global_state
             if not torch.equal(full.global_state[n], half.global_state[n])]
    assert moved  # really computed in another precision
    final_full = full.evaluate()["loss"]
    final_half = half.evaluate()["loss"]
    assert math.isfinite(final_half) and abs(final_half - final_full) < 0.05 * abs(final_full)


def test_float16_with_a_gradient_scaler_trains_finite():
    engine = run(config(method={"name": "fedit", "rank": 2}, model={"dtype": "float16"}))
    assert all(torch.isfinite(t).all() for t in engine.global_state.values())
    assert math.isfinite(engine.evaluate()["loss"])


def test_cast_tensors_changes_only_the_named_floating_tensors():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    cast_tensors(model, ["0.weight", "1.running_mean", "1.num_batches_tracked"], torch.bfloat16)
    state = model.state_dict()
    assert state["0.weight"].dtype is torch.bfloat16 and state["0.bias"].dtype is torch.float32
    assert state["1.running_mean"].dtype is torch.bfloat16
    assert state["1.num_batches_tracked"].dtype is torch.int64


# -- the local optimizer -------------------------------------------------------------------------

def _data(n: int = 16, seed: int = 0) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1
    return ClientData(0, 0, x, y, x[:4], y[:4])


def _linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 1))


def _job(method: Method, slots: StateSlots, config: TrainConfig, private=None, round_=1,
         data: ClientData | None = None) -> ClientJob:
    from floral.methods.base import split_roles

    global_names, private_names = split_roles(method.roles(slots.model))
    return ClientJob(
        slots.snapshot(global_names),
        private if private is not None else slots.snapshot(private_names),
        data or _data(), config, get_objective("regression"), seed=7, round=round_,
    )


def _one_step(method: Method, config: TrainConfig):
    model = method.build_model(_linear(), None)  # type: ignore[arg-type]
    slots = StateSlots(model)
    return method.client_step(slots, _job(method, slots, config))


def _hand_steps(model: nn.Module, optimizer, data: ClientData, config: TrainConfig,
                seed: int = 7, accumulation: int = 1, clip: float = 0.0) -> None:
    """The local epochs written out: the same seeded batch order, plain torch."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(data.num_train, generator=generator)
    batches = order.split(config.batch_size)
    for i, batch in enumerate(batches):
        if i % accumulation == 0:
            optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(data.x_train[batch]), data.y_train[batch])
        (loss / accumulation).backward()
        if (i + 1) % accumulation and i + 1 < len(batches):
            continue
        if clip:
            nn.utils.clip_grad_norm_(list(model.parameters()), clip)
        optimizer.step()


def test_adamw_step_equals_torch_adamw_by_hand():
    config = TrainConfig(optimizer="adamw", lr=0.01, batch_size=4, weight_decay=0.1,
                         betas=[0.8, 0.99], eps=1e-6)
    method = get_method("fedavg")
    slots = StateSlots(_linear())
    update = method.client_step(slots, _job(method, slots, config))
    model = _linear()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    _hand_steps(model, torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.99),
                                         eps=1e-6, weight_decay=0.1), _data(), config)
    for name, p in model.named_parameters():
        expected = (p.detach() - start[name]) * 16
        assert torch.allclose(update.upload[name], expected, atol=1e-6), name
    assert not any(n.startswith(OPTIMIZER_PREFIX) for n in update.upload)


def test_a_local_adaptor_keeps_its_adamw_moments_between_rounds_and_never_sends_them():
    config = TrainConfig(optimizer="adamw", lr=0.02, batch_size=4)
    method = get_method("local-adaptor", {"rank": 1, "precondition": False})
    model = method.build_model(_linear(), None)  # type: ignore[arg-type]
    slots = StateSlots(model)
    job = _job(method, slots, config)
    first = method.client_step(slots, job)
    kept = {n for n in first.private if n.startswith(OPTIMIZER_PREFIX)}
    assert {n.split("/")[1] for n in kept} == {"step", "exp_avg", "exp_avg_sq"}
    assert not any(n.startswith(OPTIMIZER_PREFIX) for n in first.upload)
    # Round 2 from the same global state: only the private part carries over.
    second = method.client_step(slots, replace(job, private_state=first.private, round=2))
    # By hand: one AdamW over the private adaptor, its state carried across both rounds.
    hand = method.build_model(_linear(), None)  # type: ignore[arg-type]
    private = [p for n, p in hand.named_parameters() if n in first.private]
    trained = [p for p in hand.parameters() if p.requires_grad]
    groups = method.param_groups(hand, config)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=0.0)
    global_start = {n: t.clone() for n, t in hand.state_dict().items() if n not in first.private}
    _hand_steps(hand, optimizer, _data(), config)
    for p in trained:  # the global tensors restart from the server's state, moments cleared
        if all(p is not q for q in private):
            optimizer.state.pop(p, None)
    with torch.no_grad():
        for n, p in hand.named_parameters():
            if n in global_start:
                p.copy_(global_start[n])
    _hand_steps(hand, optimizer, _data(), config)
    got = dict(hand.named_parameters())
    for name, value in second.private.items():
        if not name.startswith(OPTIMIZER_PREFIX):
            assert torch.allclose(value, got[name].detach(), atol=1e-6), name
    assert float(second.private[f"{OPTIMIZER_PREFIX}step/{next(iter(kept)).split('/', 2)[2]}"]) \
        == 2 * math.ceil(16 / 4)


def test_sgd_keeps_no_optimizer_state():
    update = _one_step(get_method("local-adaptor", {"rank": 1}),
                       TrainConfig(optimizer="sgd", momentum=0.9, batch_size=4))
    assert not any(n.startswith(OPTIMIZER_PREFIX) for n in update.private)


@pytest.mark.parametrize(("schedule", "warmup", "expected"), [
    ("constant", 0, [1.0, 1.0, 1.0, 1.0]),
    ("constant", 2, [0.5, 1.0, 1.0, 1.0]),
    ("linear", 0, [1.0, 0.75, 0.5, 0.25]),
    ("cosine", 0, [1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2]),
    ("cosine", 2, [0.5, 1.0, 1.0, 0.5]),
])
def test_learning_rate_schedules_over_rounds(schedule, warmup, expected):
    config = TrainConfig(rounds=4, lr_schedule=schedule, warmup_rounds=warmup)
    got = [round_lr_factor(config, r) for r in range(1, 5)]
    assert got == pytest.approx(expected)


def test_a_scheduled_round_steps_with_the_scheduled_rate():
    method = get_method("fedavg")
    config = TrainConfig(rounds=4, lr=0.1, batch_size=16, lr_schedule="linear")
    slots = StateSlots(_linear())
    update = method.client_step(slots, _job(method, slots, config, round_=3))
    model = _linear()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    _hand_steps(model, torch.optim.SGD(model.parameters(), lr=0.1 * 0.5), _data(), config)
    for name, p in model.named_parameters():
        assert torch.allclose(update.upload[name], (p.detach() - start[name]) * 16, atol=1e-6)


def test_gradient_accumulation_equals_the_larger_batch():
    method = get_method("fedavg")
    small = TrainConfig(lr=0.1, batch_size=4, grad_accumulation=2)
    large = TrainConfig(lr=0.1, batch_size=8)
    slots = StateSlots(_linear())
    accumulated = method.client_step(slots, _job(method, slots, small))
    slots = StateSlots(_linear())
    # Same seeded order: pairs of 4-example batches are the 8-example batches.
    whole = method.client_step(slots, _job(method, slots, large))
    for name in whole.upload:
        assert torch.allclose(accumulated.upload[name], whole.upload[name], atol=1e-6), name


def test_gradient_clipping_matches_clip_grad_norm_by_hand():
    method = get_method("fedavg")
    config = TrainConfig(lr=0.5, batch_size=4, max_grad_norm=0.1)
    slots = StateSlots(_linear())
    update = method.client_step(slots, _job(method, slots, config))
    model = _linear()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    _hand_steps(model, torch.optim.SGD(model.parameters(), lr=0.5), _data(), config, clip=0.1)
    for name, p in model.named_parameters():
        assert torch.allclose(update.upload[name], (p.detach() - start[name]) * 16, atol=1e-6)
    unclipped = method.client_step(StateSlots(_linear()),
                                   _job(method, StateSlots(_linear()), TrainConfig(lr=0.5,
                                                                                   batch_size=4)))
    assert not torch.allclose(unclipped.upload["0.weight"], update.upload["0.weight"])


def test_adamw_runs_end_to_end_and_resumes_with_the_moments(tmp_path):
    from floral.run import run_experiment

    cfg = config(method={"name": "local-adaptor", "rank": 2},
                 train={"optimizer": "adamw", "lr": 0.01, "rounds": 4,
                        "lr_schedule": "cosine", "warmup_rounds": 1})
    full = run_experiment(cfg, tmp_path / "full")

    def stop(result, latest):
        if result.round == 2:
            raise KeyboardInterrupt

    half = resolve_config({**cfg.to_dict(), "engine": {**cfg.to_dict()["engine"],
                                                       "checkpoint_every": 1}})
    with pytest.raises(KeyboardInterrupt):
        run_experiment(half, tmp_path / "resumed", on_round=stop)
    resumed = run_experiment(half, tmp_path / "resumed", resume=True)
    assert resumed.final == full.final


# -- compilation and threads ---------------------------------------------------------------------

# fdlora and pfedlora train in phases (floral.methods.phases), each phase its own tensors.
@pytest.mark.parametrize("name", ["fedit", "fdlora", "pfedlora"])
def test_compiled_step_gives_the_eager_numbers_and_compiles_once(monkeypatch, name):
    from torch._dynamo.testing import CompileCounter

    import floral.train.device as device

    torch._dynamo.reset()
    counter = CompileCounter()
    monkeypatch.setattr(device, "COMPILE_BACKEND", counter)
    method = {"name": name, "rank": 2}
    eager = run(config(method=method, train={"rounds": 1}))
    engine, _ = build_engine(config(method=method, engine={"compile": True}))
    engine.run_round()
    after_first = counter.frame_count
    for _ in range(2):
        engine.run_round()
    assert after_first >= 1  # the clients trained through the compiled forward
    assert counter.frame_count == after_first  # no recompiles per client or round
    once, _ = build_engine(config(method=method, engine={"compile": True}, train={"rounds": 1}))
    once.run_round()
    for name, value in eager.global_state.items():
        assert torch.allclose(once.global_state[name], value, atol=1e-6), name


def test_threads_are_set_while_clients_train_and_restored_after():
    seen = []

    class Watching(type(get_method("fedavg"))):  # type: ignore[misc]
        batchable = False  # its own train_locally

        def train_locally(self, slots, job):
            seen.append(torch.get_num_threads())
            return super().train_locally(slots, job)

    cfg = config(method={"name": "fedavg"}, engine={"threads": 2})
    engine, _ = build_engine(cfg)
    engine.worker.method = Watching()
    before = torch.get_num_threads()
    engine.run_round()
    assert seen and set(seen) == {2}
    assert torch.get_num_threads() == before


def test_flower_nodes_pin_threads_as_the_local_engine_does(tmp_path, monkeypatch):
    # One client worker on both transports: a node's steps and evaluations run on the
    # experiment's `engine.threads` too.
    pytest.importorskip("flwr")
    from support.flower import run_loopback

    import floral.engines.worker as worker

    seen: list[int] = []
    real = worker.threads

    def watched(count: int):  # noqa: ANN202
        seen.append(count)
        return real(count)

    monkeypatch.setattr(worker, "threads", watched)
    cfg = config(method={"name": "fedavg"}, engine={"threads": 2},
                 train={"rounds": 1})
    run_loopback(cfg, tmp_path / "flower")
    assert seen and set(seen) == {2}


def test_automatic_threads_are_one_for_small_steps_only():
    assert default_threads(nn.Linear(10, 10), 32) == 1
    assert default_threads(nn.Linear(2000, 2000), 64) == 0  # 0: torch's own choice


def test_engine_takes_a_placement():
    method = get_method("fedavg")
    placement = Placement(CPU, torch.float32, False)
    cfg = config()
    engine, task = build_engine(cfg)
    other = LocalEngine(method, task, _mlp_for(task), cfg.train, EngineConfig(), 0,
                        placement=placement)
    assert other.worker.placement is placement


def _mlp_for(task) -> nn.Module:
    from floral.models import ModelConfig, build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(name="mlp", hidden=[4]), task)


def test_gradient_checkpointing_gives_the_same_gradients_on_a_language_model():
    pytest.importorskip("transformers")
    from floral.llm import build_causal_lm
    from floral.models import enable_gradient_checkpointing

    def grads(checkpointing: bool):
        torch.manual_seed(0)
        model = build_causal_lm("tiny-llama", 32).train()
        if checkpointing:
            enable_gradient_checkpointing(model)
        ids = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(1))
        logits = model(ids[:, :-1]).flatten(0, 1)
        nn.functional.cross_entropy(logits, ids[:, 1:].flatten()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)


def test_the_batched_engine_leaves_accumulating_steps_to_the_sequential_one():
    cfg = config(method={"name": "fedavg"}, train={"grad_accumulation": 2},
                 engine={"batch_clients": 4})
    seq = config(method={"name": "fedavg"}, train={"grad_accumulation": 2})
    a, b = run(cfg), run(seq)
    assert all(torch.equal(a.global_state[n], b.global_state[n]) for n in a.global_state)


def test_a_flower_node_builds_on_the_device_its_node_config_names():
    pytest.importorskip("flwr")
    from floral.flower_app import experiment_text, runtime_for

    runtime = runtime_for(experiment_text(config()), "cpu")
    assert runtime.worker.placement.device == CPU
    with pytest.raises(ConfigError, match="^device: unknown 'tpu'"):
        runtime_for(experiment_text(config()), "tpu")
