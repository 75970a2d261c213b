"""pFedLoRA on one pretrained language model cut to a depth per client (`model.depths`): a
client of depth d computes and generates what the model cut to d blocks does, keeps and trains
only those blocks, and uploads only the shared adapter."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from floral.errors import ConfigError

pytest.importorskip("transformers")

from support.data import (  # noqa: E402
    translations_config,
    write_locale,
    write_rda_folder,  # noqa: E402
)

from floral.experiment import build_engine, resolve_config  # noqa: E402
from floral.llm import build_causal_lm  # noqa: E402
from floral.llm.depth import (  # noqa: E402
    DEPTH_BUFFER,
    DEPTHS_BUFFER,
    block_of,
    decoder_blocks,
    keep_first_blocks,
    make_depth_family,
)
from floral.llm.generate import greedy_generate  # noqa: E402
from floral.train.state import is_optimizer_key, payload_bytes  # noqa: E402

VOCAB = 40
DEPTHS = [2, 1]  # the tiny models have 2 decoder blocks
BLOCK0 = ["*.layers.0.self_attn.q_proj", "*.layers.0.self_attn.v_proj"]
PREFIX = "lm.model.layers."


def random_family(name: str):
    """A tiny model with weights large enough that greedy generation varies, and the family of
    its depths; returns (family, an independent copy of the full model)."""
    torch.manual_seed(0)
    model = build_causal_lm(name, VOCAB).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.copy_(torch.randn(parameter.shape) * 2 / parameter.shape[-1] ** 0.5)
    full = copy.deepcopy(model)
    make_depth_family(model.lm, DEPTHS)
    return model, full


def set_depth(model, depth: int) -> None:
    getattr(decoder_blocks(model.lm), DEPTH_BUFFER).fill_(depth)


def cut_to(model, depth: int):
    """A copy of `model` (a family or not) cut to its first `depth` blocks, computed apart."""
    cut = copy.deepcopy(model)
    decoder = cut.lm.get_decoder()
    for attribute in ("layers", "h"):
        if hasattr(decoder, attribute):
            blocks = getattr(decoder, attribute)
            setattr(decoder, attribute, nn.ModuleList(blocks._modules.values()))
    keep_first_blocks(cut.lm, depth)
    return cut


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_a_client_of_depth_d_computes_the_model_cut_to_d_blocks(name):
    family, full = random_family(name)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    logits = {}
    for depth in (1, 2):
        set_depth(family, depth)
        cut = cut_to(full, depth)
        with torch.no_grad():
            expected = cut(ids)
            assert torch.equal(family(ids), expected)
        with torch.enable_grad():  # as in training (eval mode: GPT-2's dropout off)
            assert torch.equal(family(ids).detach(), expected)
        logits[depth] = expected
    assert not torch.allclose(logits[1], logits[2], atol=1e-3)
    assert len(decoder_blocks(family.lm)) == 2  # every block is still held
    set_depth(family, -1)
    with pytest.raises(ConfigError, match="model.depths: each client runs its own depth"):
        family(ids)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_greedy_generation_at_depth_d_is_the_cut_models(name):
    family, full = random_family(name)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, VOCAB, (n,), generator=generator).tolist() for n in (3, 7, 5, 1)]
    answers = {}
    for depth in (1, 2):
        set_depth(family, depth)
        answers[depth] = greedy_generate(family, prompts, eos_id=0, pad_id=0, max_new_tokens=8,
                                         batch_tokens=12)
        expected = greedy_generate(cut_to(full, depth), prompts, eos_id=0, pad_id=0,
                                   max_new_tokens=8, batch_tokens=12)
        assert answers[depth] == expected
    assert answers[1] != answers[2]


def engine_config(rda: str, method: dict, **model):
    return resolve_config({
        "seed": 5,
        "task": {"dataset": "austen", "shift": "none", "num_clients": 4, "num_clusters": 2,
                 "tokenizer": "bytes", "block_size": 12, "samples_per_client": 6,
                 "data_dir": rda},
        "model": {"name": "tiny-llama", "depths": DEPTHS, **model},
        "method": {"rank": 2, "include": BLOCK0, "bias": False, **method},
        "train": {"rounds": 1, "clients_per_round": 1.0, "batch_size": 3, "lr": 0.05,
                  "optimizer": "adamw"},
        "engine": {"eval_every": 1},
    })


@pytest.fixture(scope="module")
def rda(tmp_path_factory):
    return str(write_rda_folder(tmp_path_factory.mktemp("rda")))


@pytest.fixture(scope="module")
def one_round(rda):
    engine, _ = build_engine(engine_config(rda, {"name": "pfedlora", "model_lr": 0.01}))
    initial = {n: t.clone() for n, t in engine.model.state_dict().items()}
    result = engine.run_round()
    return engine, initial, result


def test_pfedlora_uploads_only_the_adapter(one_round):
    engine, _, result = one_round
    names = set(engine.global_state)
    assert names and all(".lora_" in n and block_of(n, PREFIX) == 0 for n in names)
    # What crossed the network: the adapter and one weight per tensor, from 4 clients.
    size = payload_bytes(engine.global_state)
    assert 4 * size <= result.bytes_up <= 4 * (size + 4 * len(names))


def test_a_clients_private_state_holds_only_its_own_depth(one_round):
    engine, initial, _ = one_round
    for k in range(4):
        private = engine.private[k]
        depth = DEPTHS[k % 2]
        blocks = {block_of(n, PREFIX) for n in private} - {None}
        assert blocks == set(range(depth))
        assert int(private[PREFIX + DEPTH_BUFFER]) == depth
        assert PREFIX + DEPTHS_BUFFER not in private
        assert not any(is_optimizer_key(n) for n in private)  # no AdamW moments kept
        assert "lm.model.norm.weight" in private and "lm.model.embed_tokens.weight" in private
        # The model phase trained the client's own model.
        assert not torch.equal(private[PREFIX + "0.mlp.up_proj.weight"],
                               initial[PREFIX + "0.mlp.up_proj.weight"])


def test_blocks_beyond_a_clients_depth_are_untouched_by_its_training(one_round):
    engine, _, _ = one_round
    deep = [n for n in engine.slots.tensors if block_of(n, PREFIX) == 1]
    for k, moved in ((1, False), (0, True)):  # depth 1, then depth 2
        before = {n: engine.slots.tensors[n].detach().clone() for n in deep}
        job = engine.local.job(k, engine.global_state, round_=2)
        engine.method.client_step(engine.slots, job)
        changed = any(not torch.equal(engine.slots.tensors[n], before[n]) for n in deep)
        assert changed == moved


def test_the_model_phase_has_its_own_learning_rate(one_round):
    engine, _, _ = one_round
    config = engine.worker.train_config
    method = engine.method
    assert method.phase(engine.model, config, "model").lr == 0.01
    assert method.phase(engine.model, config, "adapter").lr == config.lr


def test_an_adapter_in_a_block_some_client_skips_is_a_config_error(rda):
    with pytest.raises(ConfigError, match=r"method.include: the adapter on "
                       r"lm.model.layers.1.self_attn.q_proj .* depth 1") as error:
        build_engine(engine_config(rda, {"name": "pfedlora", "include": ["*.q_proj"]}))
    assert "\n" not in str(error.value)
    # Where every client runs block 1, an adapter may sit there.
    engine, _ = build_engine(engine_config(rda, {"name": "pfedlora", "include": ["*.q_proj"]},
                                           depths=[2, 2]))
    assert any(block_of(n, PREFIX) == 1 for n in engine.global_state)


def test_only_methods_that_assign_depths_run_the_family(rda):
    engine, _ = build_engine(engine_config(rda, {"name": "fedit"}))
    with pytest.raises(ConfigError, match="model.depths: each client runs its own depth"):
        engine.run_round()


@pytest.mark.parametrize("method", ["pfedlora", "local-hetero"])
def test_translations_run_end_to_end_with_clients_of_two_depths(tmp_path, method):
    pytest.importorskip("sacrebleu")
    from floral.export import generate_answers
    from floral.run import run_experiment

    root = write_locale(tmp_path / "locale")
    config = resolve_config({
        "name": f"depths-{method}",
        "task": dict(translations_config(root).__dict__),
        "model": {"name": "tiny-llama", "depths": DEPTHS},
        "method": {"name": method, **({"rank": 2, "bias": False, "include": BLOCK0,
                                       "model_lr": 0.005} if method == "pfedlora" else {})},
        "train": {"rounds": 2, "clients_per_round": 1.0, "batch_size": 2, "lr": 0.01,
                  "optimizer": "adamw"},
        "engine": {"eval_every": 2},
    })
    summary = run_experiment(config, tmp_path / "out")
    assert summary.rounds == 2
    assert (summary.bytes_up == 0) == (method == "local-hetero")
    for key in ("chrf", "exact_match", "chrf_client1", "perplexity_client0"):
        assert math.isfinite(summary.final[key])
    # The saved state gives client 1 (depth 1) its own model back: its logits and answers are
    # the cut model's, loaded with its private tensors (and the adapter).
    engine, task = build_engine(config)
    engine.load_state_dict(load_file(tmp_path / "out" / "state.safetensors"))
    model = engine.client_model(1).eval()
    cut = cut_to(model, 1)
    with torch.no_grad():
        assert torch.equal(model(task.clients[1].x_test), cut(task.clients[1].x_test))
    prompts = task.clients[1].generation.prompts[:3]
    tokenizer = task.generation.tokenizer
    ends = {"eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id, "max_new_tokens": 6}
    assert greedy_generate(model, prompts, **ends) == greedy_generate(cut, prompts, **ends)
    assert generate_answers(tmp_path / "out", 1, ["Spain"])  # the command's path runs too
