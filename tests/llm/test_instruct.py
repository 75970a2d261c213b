"""Prompt/response tasks for language models: the .mo reader, the translations task, users'
JSON lines, the chat template, response-only loss, chrF, batched generation, and a run.

Every .mo file here is written by the test's own writer (from the GNU gettext manual's format),
and the reader is checked against the standard library's gettext as well.
"""

from __future__ import annotations

import gettext
import json
import math
from pathlib import Path

import pytest
import torch
from support import ROOT
from support.data import COUNTRIES, LANGUAGES, translations_config, write_locale, write_mo

from floral.data import TaskConfig, build_task
from floral.data.instruct import Example, encode_examples
from floral.data.mo import read_mo
from floral.data.text import ByteTokenizer
from floral.errors import ConfigError
from floral.train.objective import IGNORE_INDEX, get_objective, next_token_loss
from floral.train.text_metrics import chrf_score, chrf_statistics, generation_sums


def test_mo_reader_on_files_it_did_not_write(tmp_path):
    entries = {
        b"Germany": b"Deutschland",
        b"menu\x04_Open": "_Öffnen".encode(),  # a context is dropped
        b"%d file\x00%d files": b"%d Datei\x00%d Dateien",  # singular of a plural
        b"Untranslated": b"",
    }
    expected = {"Germany": "Deutschland", "_Open": "_Öffnen", "%d file": "%d Datei"}
    for order in "<>":
        assert read_mo(write_mo(tmp_path / f"x{int(order == '<')}.mo", entries, order)) == expected
    latin = {b"Spain": "España".encode("latin-1")}
    assert read_mo(write_mo(tmp_path / "l.mo", latin, charset="ISO-8859-1")) == {"Spain": "España"}
    # The standard library's reader agrees on what both read.
    with open(tmp_path / "x1.mo", "rb") as f:
        catalog = gettext.GNUTranslations(f)._catalog  # type: ignore[attr-defined]
    assert catalog["Germany"] == "Deutschland" and catalog[("%d file", 0)] == "%d Datei"
    (tmp_path / "bad.mo").write_bytes(b"\x00" * 40)
    with pytest.raises(ConfigError, match="bad magic"):
        read_mo(tmp_path / "bad.mo")


@pytest.mark.parametrize("catalog", ["iso_3166-1", "gtk20"])
def test_mo_reader_agrees_with_gettext_on_debian_catalogs(catalog):
    path = Path("/usr/share/locale/de/LC_MESSAGES") / f"{catalog}.mo"
    if not path.is_file():
        pytest.skip(f"{path} not installed")
    ours = read_mo(path)
    with open(path, "rb") as f:
        theirs = gettext.GNUTranslations(f)._catalog  # type: ignore[attr-defined]
    plain = {k: v for k, v in theirs.items() if isinstance(k, str) and k and "\x04" not in k}
    assert {k: ours[k] for k in plain} == plain
    assert len(ours) >= len(plain) > 100


def decode_targets(y: torch.Tensor) -> str:
    return bytes(t for t in y.tolist() if t != IGNORE_INDEX).decode()


def test_translations_task_one_language_per_cluster_and_held_out_strings(tmp_path):
    task = build_task(translations_config(write_locale(tmp_path)), seed=3)
    assert task.kind == "causal-lm" and task.num_clusters == 2 and task.input_shape == (32,)
    trained: set[str] = set()
    held_out: set[str] = set()
    for client in task.clients:
        assert client.cluster == client.client_id % 2
        translate = LANGUAGES[list(LANGUAGES)[client.cluster]]
        for x, y in zip(client.x_train, client.y_train, strict=True):
            prompt = bytes(t for t in x.tolist() if t).decode()
            english = prompt.split("\n")[0].removeprefix("Translate: ")
            assert english in COUNTRIES and "up" not in prompt.lower().split()
            # Loss targets: the translation and the end byte, nothing of the prompt.
            assert decode_targets(y) == translate(english) + "\x00"
            trained.add(english)
        assert client.generation is not None
        refs = client.generation.references
        prompts = [bytes(p).decode().removeprefix("Translate: ").strip()
                   for p in client.generation.prompts]
        assert refs == [translate(p) for p in prompts] and refs
        assert client.generation.sources == prompts
        held_out.update(prompts)
    assert trained and held_out and not trained & held_out
    assert trained | held_out == set(COUNTRIES)
    # The same English strings, in each language: clients 0 and 1 get the same prompts.
    first, second = task.clients[0].generation, task.clients[1].generation
    assert first is not None and second is not None and first.prompts == second.prompts


def test_missing_catalog_names_the_debian_package(tmp_path):
    for catalog, package in [("iso_3166-1", "iso-codes"), ("glib20", "libglib2.0-data"),
                             ("gtk20", "libgtk2.0-common")]:
        cfg = translations_config(tmp_path, catalogs=[catalog])
        with pytest.raises(ConfigError, match=f"apt-get install {package}") as error:
            build_task(cfg, 0)
        assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="task.languages"):
        build_task(translations_config(tmp_path, languages=["up"]), 0)
    with pytest.raises(ConfigError, match="task.prompt_template"):
        build_task(translations_config(tmp_path, prompt_template="Translate {x}"), 0)


# -- response-only loss ---------------------------------------------------------------------------


def test_loss_and_gradient_come_from_response_tokens_only():
    tokenizer = ByteTokenizer()
    examples = [Example.pair("Spain", "ESPANA"), Example.pair("Peru", "UREP")]
    x, y, prompts, _ = encode_examples(tokenizer, "plain", examples, max_length=16)
    assert x.shape == y.shape == (2, 16)
    assert prompts[0] == list(b"Spain\n")
    # Targets: -100 over the prompt (all but its last position) and the padding.
    assert y[0, :5].eq(IGNORE_INDEX).all() and y[0, 5:12].tolist() == [*b"ESPANA", 0]
    assert y[0, 12:].eq(IGNORE_INDEX).all() and x[0, 12:].eq(0).all()
    torch.manual_seed(0)
    logits = torch.randn(2, 16, 256, requires_grad=True)
    loss = next_token_loss(logits, y)
    loss.backward()
    # Independent: the mean negative log-likelihood of the response tokens alone.
    log_probs = torch.log_softmax(logits.detach(), dim=-1)
    picked = [-log_probs[i, t, y[i, t]] for i in range(2) for t in range(16)
              if y[i, t] != IGNORE_INDEX]
    assert math.isclose(loss.item(), torch.stack(picked).mean().item(), rel_tol=1e-6)
    assert logits.grad is not None
    ignored = y == IGNORE_INDEX
    assert logits.grad[ignored].abs().max() == 0 and logits.grad[~ignored].abs().min() > 0
    # Evaluation counts the response tokens only, for perplexity.
    result = get_objective("causal-lm")._sums(logits.detach(), y)
    assert result[2] == len(picked)
    assert math.isclose(result[0], torch.stack(picked).sum().item(), rel_tol=1e-6)


def test_long_examples_are_cut_response_first():
    tokenizer = ByteTokenizer()
    x, y, prompts, kept = encode_examples(
        tokenizer, "plain", [Example.pair("abcdef", "XYZ"), Example.pair("a", "B")], 8)
    assert kept == [0, 1] and prompts[0] == list(b"abcdef\n")
    assert decode_targets(y[0]) == "X"  # 7 prompt tokens leave room for one response token
    _, _, _, kept = encode_examples(tokenizer, "plain", [Example.pair("abcdef", "XYZ")], 8,
                                    drop_long=True)
    assert kept == []


# -- chrF ---------------------------------------------------------------------------------------


def test_chrf_equals_sacrebleu_sentence_and_corpus():
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps = ["Deutschland", "République française", "Espagne", "", "Bundesrepublik Deutchland",
            "a b", "Italia"]
    refs = ["Deutschland", "République fédérale", "Espagne du Sud", "Peru", "Deutschland",
            "a", "Italien"]
    for hyp, ref in zip(hyps, refs, strict=True):
        theirs = sacrebleu.sentence_chrf(hyp, [ref]).score
        assert math.isclose(chrf_score(chrf_statistics(hyp, ref)), theirs, abs_tol=1e-9)
    sums = generation_sums(hyps, refs)
    stats = [sums[k] for k in sums if k.startswith("chrf_")]
    assert math.isclose(chrf_score(stats), sacrebleu.corpus_chrf(hyps, [refs]).score,
                        abs_tol=1e-9)
    assert sums["exact"] == 1 and sums["generated"] == 7


# -- users' JSON lines --------------------------------------------------------------------------


def jsonl_config(path: Path, **changes) -> TaskConfig:
    options = dict(dataset="jsonl", shift="none", num_clients=2, num_clusters=2,
                   tokenizer="bytes", template="plain", data_dir=str(path), max_length=24,
                   test_fraction=0.25, min_samples=0)
    return TaskConfig(**{**options, **changes})


def write_lines(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_one_file_per_client_or_a_client_column(tmp_path):
    rows = [{"prompt": f"q{i}", "response": f"a{i}", "cluster": "x"} for i in range(8)]
    write_lines(tmp_path / "folder" / "alice.jsonl", rows)
    write_lines(tmp_path / "folder" / "bob.jsonl", [{**r, "cluster": "y"} for r in rows])
    by_file = build_task(jsonl_config(tmp_path / "folder"), seed=0)
    both = [{**r, "client": "alice"} for r in rows] + [{**r, "client": "bob", "cluster": "y"}
                                                        for r in rows]
    one_file = build_task(jsonl_config(write_lines(tmp_path / "all.jsonl", both)), seed=0)
    for task in (by_file, one_file):
        assert [c.cluster for c in task.clients] == [0, 1]
        client = task.clients[0]
        assert len(client.x_train) == 6 and len(client.x_test) == 2
        assert client.generation is not None
        seen = {decode_targets(y).rstrip("\x00") for y in client.y_train}
        seen |= set(client.generation.references)
        assert seen == {f"a{i}" for i in range(8)}
    assert torch.equal(by_file.clients[1].x_train, one_file.clients[1].x_train)
    with pytest.raises(ConfigError, match="task.num_clients = 2"):
        build_task(jsonl_config(tmp_path / "folder", num_clients=3), 0)


@pytest.mark.parametrize(("rows", "message"), [
    ([{"prompt": "a", "response": "b", "client": 1}, "{not json"], r"all.jsonl:2: not valid JSON"),
    ([{"prompt": "a", "client": 1}], r"all.jsonl:1: no 'response' field"),
    ([{"prompt": "a", "response": "b"}], r"all.jsonl:1: no 'client'"),
    ([{"messages": [{"role": "user", "content": "a"}], "client": 1}],
     r"all.jsonl:1: 'messages' must end with an \"assistant\""),
    ([{"prompt": "a", "response": "b", "client": 1, "cluster": 0},
      {"prompt": "a", "response": "b", "client": 1, "cluster": 1}], r"all.jsonl:2: client '1'"),
    ([{"prompt": "a", "response": "b", "client": 1}], r"client '1' has 1 example"),
])
def test_bad_jsonl_lines_are_one_line_errors_naming_file_and_line(tmp_path, rows, message):
    path = write_lines(tmp_path / "all.jsonl", rows)
    with pytest.raises(ConfigError, match=message) as error:
        build_task(jsonl_config(path, num_clients=1, num_clusters=1), 0)
    assert "\n" not in str(error.value)


def test_empty_client_file_is_an_error(tmp_path):
    write_lines(tmp_path / "d" / "a.jsonl", [{"prompt": "a", "response": "b"}] * 3)
    (tmp_path / "d" / "b.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match=r"b.jsonl: no examples \(client 'b' is empty\)"):
        build_task(jsonl_config(tmp_path / "d", num_clusters=1), 0)


# -- models: chat template, generation, a run -----------------------------------------------------

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from support.llm import write_chat_tokenizer  # noqa: E402

from floral.adapters import AdapterSpec, attach  # noqa: E402
from floral.llm import build_causal_lm  # noqa: E402
from floral.llm.generate import greedy_generate  # noqa: E402


def test_chat_template_renders_messages_and_learns_the_last_answer(tmp_path):
    folder = write_chat_tokenizer(tmp_path / "tok")
    rows = [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": f"hi {i}"},
                          {"role": "assistant", "content": f"yo {i}"}]} for i in range(4)]
    write_lines(tmp_path / "d" / "c.jsonl", rows)
    task = build_task(jsonl_config(tmp_path / "d", num_clients=1, num_clusters=1,
                                   tokenizer=f"hf:{folder}", template="auto", max_length=48), 0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    client = task.clients[0]
    x, y = client.x_train[0], client.y_train[0]
    i = next(int(t) for t in tokenizer.decode(x).split("hi ")[1][:1])
    prompt = f"<|system|>Be brief.<|end|><|user|>hi {i}<|end|><|assistant|>"
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    response_ids = tokenizer(f"yo {i}<|end|>", add_special_tokens=False).input_ids
    assert len(prompt_ids) == len(b"Be brief.") + len(f"hi {i}") + 5  # specials are one token
    n = len(prompt_ids) + len(response_ids)
    assert x[: n - 1].tolist() == (prompt_ids + response_ids)[:-1]
    assert y[: len(prompt_ids) - 1].eq(IGNORE_INDEX).all()
    assert y[len(prompt_ids) - 1 : n - 1].tolist() == response_ids
    assert y[n - 1 :].eq(IGNORE_INDEX).all()
    assert client.generation is not None
    assert client.generation.prompts[0][-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
    with pytest.raises(ConfigError, match="task.template: 'chat' needs"):
        build_task(jsonl_config(tmp_path / "d", num_clients=1, num_clusters=1,
                                template="chat"), 0)


def test_batched_generation_equals_one_argmax_loop_per_prompt():
    torch.manual_seed(0)
    model = build_causal_lm("tiny-llama", 64)
    attach(model, AdapterSpec(num_adaptors=2, rank=4, layer_types=("linear",),
                              include=("*.q_proj", "*.v_proj", "*.o_proj")))
    with torch.no_grad():  # adaptors far from zero, so that they change what is generated
        for name, parameter in model.named_parameters():
            if "lora_" in name or "floral_router" in name:
                parameter.copy_(torch.randn(parameter.shape) * 2)
    model.eval()
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 64, (n,), generator=generator).tolist() for n in (3, 7, 5, 1, 9)]

    def argmax_loop(prompt: list[int]) -> list[int]:
        ids, out = list(prompt), []
        for _ in range(8):
            with torch.no_grad():
                token = int(model(torch.tensor([ids]))[0, -1].argmax())
            if token == 0:
                break
            out.append(token)
            ids.append(token)
        return out

    expected = [argmax_loop(p) for p in prompts]
    assert len({tuple(e) for e in expected}) > 1
    got = greedy_generate(model, prompts, eos_id=0, pad_id=0, max_new_tokens=8, batch_tokens=20)
    assert got == expected


def test_translations_run_reports_chrf_that_generation_reproduces(tmp_path, capsys):
    sacrebleu = pytest.importorskip("sacrebleu")
    from floral.experiment import resolve_config
    from floral.export import generate_answers
    from floral.run import run_experiment

    root = write_locale(tmp_path / "locale")
    task_table = {k: v for k, v in translations_config(root).__dict__.items()}
    config = resolve_config({
        "name": "tiny-translations",
        "task": task_table,
        "model": {"name": "tiny-llama"},
        "method": {"name": "floral", "rank": 2, "train_base": False, "bias": False,
                   "include": ["*.q_proj", "*.v_proj"]},
        "train": {"rounds": 2, "clients_per_round": 1.0, "batch_size": 2, "lr": 0.01,
                  "optimizer": "adamw"},
        "engine": {"eval_every": 2},
    })
    summary = run_experiment(config, tmp_path / "out")
    final = summary.final
    for key in ("chrf", "exact_match", "chrf_cluster0", "chrf_client3", "exact_match_client0",
                "perplexity_client2", "router_ari"):
        assert key in final and math.isfinite(final[key])
    header = (tmp_path / "out" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"chrf", "chrf_cluster1", "exact_match_client1"} <= set(header)
    # Cluster 0's chrF: its clients' answers to their held-out English strings, again.
    task = build_task(config.task, config.seed)
    hyps, refs = [], []
    for client in task.clients:
        if client.cluster != 0:
            continue
        assert client.generation is not None
        hyps += generate_answers(tmp_path / "out", client.client_id, client.generation.sources)
        refs += client.generation.references
    assert math.isclose(final["chrf_cluster0"], sacrebleu.corpus_chrf(hyps, [refs]).score,
                        abs_tol=1e-6)
    # The command line: one answer per prompt; a client that does not exist is one line.
    from floral.cli import main

    capsys.readouterr()
    assert main(["generate", str(tmp_path / "out"), "--client", "0", "Spain", "Peru"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == generate_answers(tmp_path / "out", 0, ["Spain", "Peru"])
    assert main(["generate", str(tmp_path / "out"), "--client", "9", "Spain"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--client: 9" in error


def test_copy_source_script_scores_the_english_strings(tmp_path, capsys):
    sacrebleu = pytest.importorskip("sacrebleu")
    import runpy

    import tomli_w

    root = write_locale(tmp_path / "locale")
    task_table = dict(translations_config(root).__dict__)
    config = tmp_path / "tr.toml"
    config.write_text(tomli_w.dumps({"task": task_table, "model": {"name": "tiny-llama"}}))
    script = ROOT / "scripts" / "copy_source.py"
    namespace = runpy.run_path(str(script))
    namespace["main"](str(config))
    lines = capsys.readouterr().out.splitlines()
    task = build_task(translations_config(root), 0)
    sources = [s for c in task.clients if c.cluster == 0 for s in c.generation.sources]
    references = [r for c in task.clients if c.cluster == 0 for r in c.generation.references]
    expected = sacrebleu.corpus_chrf(sources, [references]).score
    assert lines[0].startswith(f"up: chrF {expected:.1f}, exact match 0.0%")
