"""The federated-LoRA family on a (tiny, random) causal language model: what each method's
paper claims, where it is a property that must hold exactly, checked on two rounds."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from support.data import write_rda_folder  # noqa: E402

from floral.experiment import build_engine, resolve_config  # noqa: E402
from floral.methods.fdlora import GLOBAL_HALF, PERSONAL_HALF  # noqa: E402

QV = ["*.q_proj", "*.v_proj"]


@pytest.fixture(scope="module")
def rda(tmp_path_factory):
    return str(write_rda_folder(tmp_path_factory.mktemp("rda")))


def run(rda, method, comm=None, rounds=2):
    config = resolve_config({
        "name": "family",
        "seed": 4,
        "task": {"dataset": "austen", "shift": "none", "num_clients": 4, "num_clusters": 2,
                 "tokenizer": "bytes", "block_size": 12, "samples_per_client": 6,
                 "data_dir": rda},
        "model": {"name": "tiny-llama"},
        "method": {"rank": 2, "include": QV, "bias": False, **method},
        "train": {"rounds": rounds, "clients_per_round": 1.0, "batch_size": 3, "lr": 0.2},
        "engine": {"eval_every": rounds},
        "comm": comm or {},
    })
    engine, _ = build_engine(config)
    initial = {n: t.clone() for n, t in engine.model.state_dict().items()}
    engine.results = [engine.run_round() for _ in range(rounds)]
    return engine, initial


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_flasc_at_density_one_is_fedit(rda):
    dense = {"download": "topk:1.0", "upload": "topk:1.0"}
    flasc, _ = run(rda, {"name": "flasc"}, comm=dense)
    fedit, _ = run(rda, {"name": "fedit"})
    assert same(flasc.global_state, fedit.global_state)
    sparse, _ = run(rda, {"name": "flasc"}, comm={"upload": "topk:0.25"})
    assert not same(sparse.global_state, fedit.global_state)


def test_hetlora_with_equal_ranks_is_fedit(rda):
    hetlora, _ = run(rda, {"name": "hetlora", "ranks": [2, 2, 2, 2]})
    fedit, _ = run(rda, {"name": "fedit"})
    for name, value in fedit.global_state.items():
        torch.testing.assert_close(hetlora.global_state[name], value, rtol=1e-6, atol=1e-7)


def test_ffa_lora_never_moves_a_and_fedsa_lora_keeps_b_at_home(rda):
    ffa, initial = run(rda, {"name": "ffa-lora"})
    trained = ffa.client_model(0).state_dict()
    a_names = [n for n in trained if n.endswith(".lora_A")]
    assert a_names and not set(a_names) & set(ffa.global_state)
    assert all(torch.equal(trained[n], initial[n]) for n in a_names)  # A: as initialized
    assert {n.rpartition(".")[2] for n in ffa.global_state} == {"lora_B"}
    assert any(not torch.equal(initial[n], ffa.global_state[n]) for n in ffa.global_state)
    fedsa, _ = run(rda, {"name": "fedsa-lora"})
    assert {n.rpartition(".")[2] for n in fedsa.global_state} == {"lora_A"}
    private_b = {n for p in fedsa.private.values() for n in p if n.endswith(".lora_B")}
    assert private_b and not private_b & set(fedsa.global_state)


def test_fdlora_never_uploads_the_personal_adaptor(rda):
    engine, _ = run(rda, {"name": "fdlora", "train_base": False})
    assert engine.global_state and all(GLOBAL_HALF in n for n in engine.global_state)
    personal = {n for p in engine.private.values() for n in p if PERSONAL_HALF in n}
    assert personal and not personal & set(engine.global_state)
    # What crossed the network: the global half and its weights, from 4 clients, per round.
    sizes = sum(t.numel() * t.element_size() for t in engine.global_state.values())
    for result in engine.results:
        assert 4 * sizes <= result.bytes_up < 4 * sizes + 4 * 4 * len(engine.global_state) + 1
