"""DP noise and a DP run's sampling come from a secret source: a curious server that knows every
public value (the config with its seed, the round, the client) cannot replay them.

The server plays its best game: it regenerates noise from every generator it could derive from
what it knows (the seeds floral uses for everything else) and subtracts it from what it got.
None of them takes the noise away, and two runs of one DP config end differently.
"""

from __future__ import annotations

import itertools

import torch

from floral.engines.driver import client_seed, sample_clients
from floral.experiment import ExperimentConfig, build_engine, resolve_config
from floral.methods.base import WEIGHT_SUFFIX
from floral.train.state import TensorDict


def _config(**train: object) -> ExperimentConfig:
    return resolve_config({
        "name": "curious", "seed": 11,
        "task": {"dataset": "synthetic-mlp", "shift": "none", "num_clients": 8,
                 "num_clusters": 1, "samples_per_client": 30},
        "model": {"name": "mlp", "hidden": [8]},
        "method": {"name": "fedavg"},
        "train": {"rounds": 4, "clients_per_round": 0.5, "batch_size": 8, "lr": 0.5,
                  "dp_clip": 0.05, **train},
        "engine": {"eval_every": 4},
    })


def _public_seeds(config: ExperimentConfig, round_: int, client: int) -> list[int]:
    """Every seed a server could derive from public values, as floral derives its own."""
    seed = config.seed
    job = client_seed(seed, round_, client)
    server = client_seed(seed, round_, -1)
    bases = [seed, job, server, client_seed(seed, round_, 0), round_, client]
    return sorted({b ^ mask for b in bases for mask in (0, 0xD1FF, 0x5A)})


def _upload(config: ExperimentConfig, client: int) -> TensorDict:
    engine, _ = build_engine(config)
    private = {client: engine.local.private_state(client)}
    return engine.worker.train(1, engine.global_state, private)[client].upload


def _names(upload: TensorDict) -> list[str]:
    return [n for n in upload if not n.endswith(WEIGHT_SUFFIX)]


def _replays(noise: TensorDict, seeds: list[int], scale: float) -> bool:
    """Whether any of the generators seeded by `seeds` draws `noise` (in floral's order)."""
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        draws = {n: scale * torch.randn(noise[n].shape, generator=generator) for n in noise}
        if all(torch.allclose(draws[n], noise[n], atol=1e-5) for n in noise):
            return True
    return False


def test_a_curious_server_cannot_replay_a_clients_local_noise():
    noisy_config = _config(dp_noise=1.0, dp_mode="local")
    clean = _upload(_config(dp_noise=0.0, dp_mode="local"), client=3)  # clipped, not noised
    noisy = _upload(noisy_config, client=3)
    names = _names(clean)
    noise = {n: noisy[n] - clean[n] for n in names}
    assert float(torch.cat([v.flatten() for v in noise.values()]).std()) > 0.01
    scale = 1.0 * 0.05
    seeds = _public_seeds(noisy_config, 1, 3)
    # The server's replay works: noise drawn from a seed in config.toml (as it once was) is
    # regenerated exactly ...
    public = torch.Generator().manual_seed(client_seed(noisy_config.seed, 1, 3) ^ 0xD1FF)
    assert _replays({n: scale * torch.randn(noise[n].shape, generator=public) for n in names},
                    seeds, scale)
    # ... and fails on the noise a client draws now.
    assert not _replays(noise, seeds, scale)
    # The same client, round and state again: other noise (none of it in config.toml).
    again = _upload(noisy_config, client=3)
    assert not all(torch.equal(again[n], noisy[n]) for n in names)


def _server_sees(config: ExperimentConfig) -> TensorDict:
    """The one upload the server update gets in round 1 (under central DP: the noised sum)."""
    engine, _ = build_engine(config)
    seen: list[TensorDict] = []
    real = engine.method.server_update

    def recording(state, uploads, optimizer):  # noqa: ANN001, ANN202
        seen.append(dict(uploads[0]))
        return real(state, uploads, optimizer)

    engine.method.server_update = recording  # type: ignore[method-assign]
    engine.run_round()
    return seen[0]


def test_a_curious_server_cannot_replay_the_central_noise():
    config = _config(dp_noise=1.0, clients_per_round=1.0)  # every client: only noise differs
    noisy = _server_sees(config)
    clean = _server_sees(_config(dp_noise=0.0, clients_per_round=1.0))
    noise = {n: noisy[n] - clean[n] for n in _names(noisy)}
    assert float(torch.cat([v.flatten() for v in noise.values()]).std()) > 0.01  # noise there
    assert not _replays(noise, _public_seeds(config, 1, -1), 1.0 * 0.05)


def test_two_runs_of_one_dp_config_differ_and_so_do_their_clients():
    config = _config(dp_noise=1.0)
    runs = []
    for _ in range(2):
        engine, _ = build_engine(config)
        results = engine.run()
        runs.append((engine.global_state, [r.clients for r in results]))
    (first, first_clients), (second, second_clients) = runs
    assert not all(torch.equal(first[n], second[n]) for n in first)
    # Who was sampled is secret too: not the seeded draw a server could make, nor repeatable.
    public = [sample_clients(config.seed, r, 8, 0.5) for r in range(1, 5)]
    draws = [first_clients, second_clients]
    assert any(a != b for a, b in itertools.combinations([public, *draws], 2))
    assert first_clients != public or second_clients != public


def test_runs_without_dp_stay_repeatable():
    config = resolve_config({**_config().to_dict(), "train": {
        **_config().to_dict()["train"], "dp_clip": 0.0, "lr": 0.05}})
    states = []
    for _ in range(2):
        engine, _ = build_engine(config)
        engine.run()
        states.append(engine.global_state)
    assert all(torch.equal(states[0][n], states[1][n]) for n in states[0])
