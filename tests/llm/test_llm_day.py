"""A language-model user's day (issue 27): their own `messages` file, a run, generation and the
PEFT export from another folder without the data, the headline metrics (chrF and exact match,
then perplexity) in the closing line, the tables, the figures and the trackers, and errors that
name what the user set, bad lines of a file all at once."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
from support.llm import MESSAGES_EXPERIMENT, message_rows, write_messages

from floral.cli import main
from floral.errors import ConfigError
from floral.experiment import load_config

pytest.importorskip("transformers")


def project(root: Path) -> Path:
    """<root>/configs/chats.toml naming ../data/chats.jsonl, as a user lays out a project."""
    write_messages(root / "data" / "chats.jsonl")
    config = root / "configs" / "chats.toml"
    config.parent.mkdir(parents=True)
    config.write_text(MESSAGES_EXPERIMENT)
    return config


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run of the project's config (its folder), started in the config's folder."""
    root = tmp_path_factory.mktemp("project")
    config = project(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(config.parent)
        assert main(["run", str(config), "--out", str(root / "runs" / "chats"), "--quiet"]) == 0
    return root / "runs" / "chats"


# -- self-contained runs ---------------------------------------------------------------------------

def test_data_paths_are_read_against_the_config_file_and_recorded_absolute(tmp_path,
                                                                           monkeypatch, capsys):
    config = project(tmp_path / "p")
    monkeypatch.chdir(tmp_path)  # not the config's folder
    code, _, err = run_cli(["run", str(config), "--out", "runs/chats", "--quiet",
                            "--set", "train.rounds=1"], capsys)
    assert code == 0, err
    recorded = (tmp_path / "runs" / "chats" / "config.toml").read_text()
    assert f'data_dir = "{tmp_path / "p" / "data" / "chats.jsonl"}"' in recorded


def test_a_run_that_recorded_relative_paths_resumes_from_the_file_naming_them(tmp_path,
                                                                             monkeypatch,
                                                                             capsys):
    """Runs recorded before paths were made absolute still resume (and are not run again)."""
    from floral.config import tomllib
    from floral.experiment import resolve_config
    from floral.run import run_experiment

    config = project(tmp_path / "p")
    monkeypatch.chdir(config.parent)
    data = tomllib.loads(MESSAGES_EXPERIMENT)  # data_dir relative, as a run recorded it
    old = resolve_config({**data, "engine": {"eval_every": 1, "checkpoint_every": 1},
                          "train": {**data["train"], "rounds": 1}})
    assert old.task.data_dir == "../data/chats.jsonl"
    run_experiment(old, tmp_path / "out")
    code, out, err = run_cli(["run", "chats.toml", "--resume", "--out", str(tmp_path / "out"),
                              "--quiet", "--set", "engine.checkpoint_every=1"], capsys)
    assert code == 0, err
    assert "after 2 rounds" in out


def test_the_run_folder_outlines_its_task(finished):
    outline = json.loads((finished / "task.json").read_text())
    assert outline["clusters"] == [0, 1, 2] and outline["kind"] == "causal-lm"
    assert outline["generation"] == {"tokenizer": "bytes", "template": "plain", "system": "",
                                     "prompt_template": "{text}", "max_new_tokens": 6}


def test_a_path_set_on_the_command_line_is_relative_to_the_current_folder(tmp_path,
                                                                         monkeypatch):
    config = project(tmp_path / "p")
    monkeypatch.chdir(tmp_path / "p")
    loaded = load_config(config, ['task.data_dir="data/chats.jsonl"'])
    assert loaded.task.data_dir == str(tmp_path / "p" / "data" / "chats.jsonl")


def test_generate_and_export_work_from_any_folder_without_the_data(finished, tmp_path,
                                                                  monkeypatch, capsys):
    peft = pytest.importorskip("peft")
    import torch

    from floral.checkpoint import load_tensors, read_toml
    from floral.experiment import build_engine, resolve_config

    prompts = ["seven", "two"]
    # What client 2 answers, from an engine rebuilt from the config and the data.
    config = resolve_config(read_toml(finished / "config.toml"))
    engine, task = build_engine(config)
    engine.load_state_dict(load_tensors(finished / "state.safetensors"))
    model = engine.client_model(2).eval()
    expected = task.generation.generate(
        model, [task.generation.prompt_ids(p) for p in prompts], engine.worker.placement)
    with torch.no_grad():
        logits = model(torch.tensor([task.generation.prompt_ids("seven")])).clone()

    data = finished.parent.parent / "data"
    shutil.move(data, tmp_path / "elsewhere")  # the training data is gone
    monkeypatch.chdir(tmp_path)
    try:
        code, out, err = run_cli(["generate", str(finished), "--client", "2", *prompts], capsys)
        assert (code, err) == (0, "")
        assert out.splitlines() == expected
        code, out, err = run_cli(["export", str(finished), "adapters", "--client", "2"], capsys)
        assert code == 0, err
        assert out.splitlines()[0] == str(Path("adapters") / "client-2")
        code, _, err = run_cli(["export", str(finished), "adapters", "--client", "5"], capsys)
        assert code == 2 and "--client: 5 is not a client" in err
    finally:
        shutil.move(tmp_path / "elsewhere", data)
    # The export is client 2's model: PEFT gives its logits.
    from floral.llm import build_causal_lm

    torch.manual_seed(config.seed)
    base = build_causal_lm("tiny-llama", 256).eval()
    loaded = peft.PeftModel.from_pretrained(base.lm, str(tmp_path / "adapters" / "client-2"))
    with torch.no_grad():
        theirs = loaded.eval()(input_ids=torch.tensor([task.generation.prompt_ids("seven")]))
    assert (theirs.logits - logits).abs().max() <= 1e-5


# -- the headline metrics --------------------------------------------------------------------------

def test_the_closing_line_leads_with_chrf_and_exact_match(finished, capsys):
    from floral.compare import load_summary
    from floral.progress import print_summary

    summary = load_summary(finished)
    assert summary.headline == ("chrf", "exact_match", "perplexity")
    capsys.readouterr()
    print_summary(summary)
    line = capsys.readouterr().out
    assert line.count("\n") == 1  # one line, also off a terminal
    assert line.startswith(f"chats · floral · seed 0: chrF {summary.final['chrf']:.2f}, "
                           f"exact match {summary.final['exact_match']:.1f}%, perplexity ")


def test_plots_of_a_run_name_the_metrics_with_whole_rounds_and_plain_titles(finished,
                                                                           monkeypatch):
    pytest.importorskip("matplotlib")
    import floral.plots
    import floral.report

    figures = []

    def keep(fig, path, tight=True):  # noqa: ARG001
        fig.canvas.draw()
        figures.append((Path(path).name, fig))
        return Path(path)

    for module, name in ((floral.report, "save_figure"), (floral.plots, "save_figure")):
        monkeypatch.setattr(module, name, keep)
    assert main(["plot", str(finished)]) == 0
    by_name = dict(figures)
    curves = by_name["curves.png"].axes
    assert [ax.get_ylabel() for ax in curves] == [
        "chrF of the held-out answers", "exact match of the held-out answers (%)",
        "test perplexity"]
    assert by_name["clusters.png"].axes[0].get_ylabel().startswith("chrF")
    for name in ("curves.png", "router_ari.png"):
        ticks = by_name[name].axes[-1].get_xticks()
        assert all(float(t).is_integer() for t in ticks), (name, ticks)
    titles = [text.get_text() for _, fig in figures for ax in fig.axes
              for text in (ax.title, ax._left_title)] + [
        fig._suptitle.get_text() for _, fig in figures if fig._suptitle is not None]
    assert not [t for t in titles if t.count("seed 0") > 1], titles


def test_compare_and_sweep_tables_lead_with_chrf(tmp_path, monkeypatch, capsys):
    config = project(tmp_path / "p")
    monkeypatch.chdir(config.parent)
    out = tmp_path / "compare"
    code, printed, err = run_cli(
        ["compare", str(config), "--methods", "floral,local-adaptor", "--out", str(out),
         "--quiet", "--jobs", "1", "--no-plots"], capsys)
    assert code == 0, err
    header = next(line for line in printed.splitlines() if "method" in line)
    assert header.index("chrF") < header.index("exact match") < header.index("perplexity")
    table = (out / "comparison.md").read_text().splitlines()
    assert table[2].startswith("| method | chrF | exact match | perplexity | router ARI |")
    with open(out / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["metric"] == "chrf" and rows[0]["headline"] == "chrf exact_match perplexity"
    assert math.isclose(float(rows[0]["mean"]), float(rows[0]["chrf_mean"]))
    from floral.sweep import collect, load_grid, write_grid_table

    tasks, methods, _ = load_grid(out)
    written = write_grid_table(collect(tasks, methods), tmp_path)
    grid = written[0].read_text()
    assert grid.index("chrF where the clients generate text") < grid.index(
        "Final exact match") < grid.index("Final perplexity")


def test_trackers_log_round_0_with_the_headline_metrics_first(tmp_path, monkeypatch):
    import floral.experiment.record as record
    from floral.run import run_experiment
    from floral.tracking import Sinks

    logged = []

    class Kept:
        def log(self, round_, values):
            logged.append((round_, list(values)))

        def close(self):
            pass

    monkeypatch.setattr(record, "open_sinks", lambda *args: Sinks([Kept()]))
    monkeypatch.chdir(project(tmp_path / "p").parent)
    config = load_config("chats.toml")
    run_experiment(config, tmp_path / "out")
    assert [r for r, _ in logged] == [0, 1, 2]
    for _, keys in logged:
        assert keys[:3] == ["chrf", "exact_match", "perplexity"]


# -- errors that name what the user set ------------------------------------------------------------

def test_a_bogus_tokenizer_is_named_as_task_tokenizer(tmp_path, monkeypatch, capsys):
    config = project(tmp_path / "p")
    monkeypatch.chdir(config.parent)
    code, _, err = run_cli(["run", str(config), "--set", 'task.tokenizer="bogus"', "--out",
                            str(tmp_path / "out"), "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("floral: error: task.tokenizer: 'bogus' is not bytes, smollm2")


def test_a_method_switched_on_the_command_line_names_the_options_it_lacks(tmp_path, monkeypatch,
                                                                         capsys):
    config = project(tmp_path / "p")
    monkeypatch.chdir(config.parent)
    code, _, err = run_cli(["run", str(config), "--set", "method.name=fedavg", "--out",
                            str(tmp_path / "out"), "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "method.name: fedavg lacks the option(s) rank, train_base, bias, include" in err
    assert "that [method] sets for floral" in err


def test_every_bad_line_is_reported_at_once_or_skipped_and_counted(tmp_path, monkeypatch,
                                                                   capsys):
    rows: list = message_rows()
    bad_lines = []
    for i in range(12):  # 12 bad lines: the first 10 are named, the rest counted
        rows.insert(2 * i + 1, "{not json" if i % 2 else {"client": "de", "prompt": "x"})
        bad_lines.append(2 * i + 2)
    config = project(tmp_path / "p")
    monkeypatch.chdir(config.parent)
    write_messages(tmp_path / "p" / "data" / "chats.jsonl", rows)
    args = ["run", str(config), "--out", str(tmp_path / "out"), "--quiet"]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and err.count("\n") == 1
    assert "chats.jsonl: 12 bad lines (line 2: no 'response' field" in err
    assert "line 4: not valid JSON" in err
    named = [n for n in bad_lines if f"line {n}:" in err]
    assert named == bad_lines[:10] and "; and 2 more)" in err
    assert 'set task.bad_lines = "skip"' in err
    code, out, err = run_cli([*args, "--set", 'task.bad_lines="skip"'], capsys)
    assert code == 0, err
    assert "12 bad line(s) of the data left out" in out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["skipped_lines"] == 12
    with pytest.raises(ConfigError, match=r"task.bad_lines: unknown 'ignore' \(choose from "
                                          r"error, skip\)"):
        load_config(config, ['task.bad_lines="ignore"'])


# -- docs ------------------------------------------------------------------------------------------

def python_block(doc: Path, marker: str) -> str:
    """The first ```python block of `doc` that holds `marker`."""
    blocks = doc.read_text().split("```python\n")[1:]
    return next(block.split("```")[0] for block in blocks if marker in block)


def test_the_peft_snippet_of_docs_llm_generates_what_floral_generate_does(
        tmp_path, monkeypatch, capsys):
    """docs/llm.md's snippet, run as written on a tiny model with a chat template in place of
    SmolLM2, on the export of a run whose prompts were rendered as the translations runs'."""
    pytest.importorskip("peft")
    pytest.importorskip("tokenizers")
    from support import ROOT
    from support.llm import write_chat_model

    import floral.llm
    from floral.experiment import resolve_config
    from floral.export import export_run, generate_answers
    from floral.run import run_experiment

    model = write_chat_model(tmp_path / "model")
    countries = {"Germany": ("Deutschland", "Allemagne"), "France": ("Frankreich", "France"),
                 "Spain": ("Spanien", "Espagne"), "Italy": ("Italien", "Italie"),
                 "Peru": ("Peru", "Pérou"), "Chile": ("Chile", "Chili")}
    rows = [{"prompt": name, "response": answers[k], "client": k, "cluster": k}
            for name, answers in countries.items() for k in (0, 1)]
    write_messages(tmp_path / "rows.jsonl", rows)
    config = resolve_config({
        "name": "translations-floral",
        "task": {"dataset": "jsonl", "shift": "none", "data_dir": str(tmp_path / "rows.jsonl"),
                 "num_clients": 2, "num_clusters": 2, "tokenizer": f"hf:{model}",
                 "template": "chat", "system": "Translate.", "max_length": 48,
                 "generate_tokens": 20},
        "model": {"name": f"hf:{model}"},
        "method": {"name": "floral", "rank": 2, "train_base": False, "bias": False,
                   "include": ["*.q_proj", "*.v_proj"]},
        # A small step: the adaptors move, and the answers are not yet the end token alone.
        "train": {"rounds": 1, "batch_size": 4, "lr": 0.002, "optimizer": "adamw"},
    })
    run = tmp_path / "results" / "translations-floral"
    run_experiment(config, run)
    monkeypatch.chdir(tmp_path)
    export_run(run, "adapters/translations-floral", clients=[1])
    monkeypatch.setattr(floral.llm, "pretrained_dir", lambda spec: model)
    snippet = python_block(ROOT / "docs" / "llm.md", "PeftModel.from_pretrained")
    capsys.readouterr()
    exec(compile(snippet, "docs/llm.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    expected = generate_answers(run, 1, ["Germany"])
    assert printed == expected and len(expected[0]) > 3, (printed, expected)


def console_output(doc: str, command: str) -> list[str]:
    """The lines a console block of `doc` shows after `$ <command>`, up to the next prompt."""
    after = doc.split(f"$ {command}\n", 1)[1]
    lines = []
    for line in after.splitlines():
        if line.startswith(("$ ", "```")):
            break
        lines.append(line)
    return lines


def test_the_messages_walk_of_docs_own_data_works_as_written(tmp_path, monkeypatch, capsys):
    """docs/own-data.md: make_chats.py and configs/chats.toml as the page shows them, run from
    the scratch folder; then generation and export from another folder, the data gone."""
    from support import ROOT

    doc = (ROOT / "docs" / "own-data.md").read_text()
    monkeypatch.chdir(tmp_path)
    exec(compile(python_block(ROOT / "docs" / "own-data.md", "make_chats.py"), "make_chats",
                 "exec"), {})
    (tmp_path / "configs").mkdir()
    toml = console_output(doc, "cat configs/chats.toml")
    (tmp_path / "configs" / "chats.toml").write_text("\n".join(toml) + "\n")
    code, out, err = run_cli(["run", "configs/chats.toml", "--out", "runs/chats", "--quiet"],
                             capsys)
    assert code == 0, err
    assert out.startswith("chats · floral · seed 0: chrF ")
    shutil.move(tmp_path / "data", tmp_path / "gone")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, out, err = run_cli(["generate", "../runs/chats", "--client", "0", "--system",
                              "Translate to German.", "seven", "eight"], capsys)
    assert code == 0 and len(out.splitlines()) == 2, err
    command = "floral export ../runs/chats adapters/chats --client 0"
    code, out, err = run_cli(command.split()[1:], capsys)
    assert code == 0, err
    assert out.splitlines() == console_output(doc, command)
