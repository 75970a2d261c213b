"""Typed settings: fixed choices are `Literal` types whose errors list the type's own choices,
and every dataset reads only the `[task]` options it declares, refusing the others by name.

Expected choices and messages are written out here by hand, not read from the code, and the
settings are also enumerated from the dataclasses: a new fixed choice without an entry below
fails `test_every_literal_setting_has_an_expected_message`.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from support import ROOT

from floral.cli import main
from floral.config import from_dict, set_dotted, to_dict
from floral.data import TaskConfig, build_task
from floral.data.registry import COMMON_OPTIONS, dataset_entry, dataset_names
from floral.data.sources import ImageData
from floral.data.task import validate_task
from floral.engines.aggregation import check_privacy
from floral.engines.attack import AttackConfig, check_attack
from floral.engines.config import EngineConfig, check_engine_config
from floral.errors import ConfigError
from floral.experiment import ExperimentConfig, load_config, resolve_config
from floral.methods import _REGISTRY
from floral.methods.hetlora import HetLoRA, HetLoRAOptions
from floral.methods.routing import check_router_mode
from floral.models.quantize import check_quantize
from floral.train.device import check_dtype
from floral.train.loop import TrainConfig, check_local_optimizer
from floral.train.optim import ServerOptimizer

CONFIGS = sorted((ROOT / "configs").glob("*.toml"))

# -- fixed choices --------------------------------------------------------------------------------

# Every fixed-choice setting and its choices, in order, as a user reads them in the docs.
EXPECTED_CHOICES = {
    "task.shift": "none, rotate, label-shift, label-set, dirichlet, classes-per-client",
    "task.template": "auto, chat, plain",
    "task.group_split": "dirichlet, per-value",
    "task.bad_lines": "error, skip",
    "model.dtype": "float32, bfloat16, float16",
    "model.quantize": "none, int8, nf4",
    "train.optimizer": "sgd, adamw",
    "train.lr_schedule": "constant, cosine, linear",
    "train.server_optimizer": "sgd, adam",
    "train.dp_mode": "central, local",
    "engine.name": "local, flower",
    "engine.eval_clients": "all, sampled",
    "attack.kind": "none, sign-flip, scale, noise, label-flip",
    "method.router": "learned, oracle",
    "method.aggregation": "zero-padded, per-rank",
    "method.conv_form": "separable, kxk-1x1",
    "method.layer_types": "linear, conv2d, embedding, norm",
}

BASE: dict[str, Any] = {
    "name": "typed",
    # jsonl reads task.template, task.group_split and task.bad_lines; nothing here reads its
    # data.
    "task": {"dataset": "jsonl", "shift": "none", "num_clients": 4, "num_clusters": 2},
    "model": {"name": "mlp", "hidden": [8]},
    "train": {"rounds": 2, "batch_size": 8},
}


def _is_literal(hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is list:
        (hint,) = typing.get_args(hint)
        origin = typing.get_origin(hint)
    return origin is typing.Literal


def _literal_fields(cls: type, prefix: str) -> dict[str, str]:
    """Dotted key -> the name of one method that has it, for each Literal setting of `cls`."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            out.update(_literal_fields(typing.cast(type, hint), f"{prefix}{name}."))
        elif _is_literal(hint):
            out[f"{prefix}{name}"] = "floral"
    return out


def _literal_settings() -> dict[str, str]:
    found = _literal_fields(ExperimentConfig, "")
    for method, entry in _REGISTRY.items():
        for key in _literal_fields(entry.cls.Options, "method."):
            found.setdefault(key, method)
    return found


LITERAL_SETTINGS = _literal_settings()


def test_every_literal_setting_has_an_expected_message():
    assert set(LITERAL_SETTINGS) == set(EXPECTED_CHOICES)


def _config(method: str, key: str, value: Any) -> dict[str, Any]:
    data = json.loads(json.dumps(BASE))
    data["method"] = {"name": method}
    set_dotted(data, key, value)
    return data


@pytest.mark.parametrize("key", sorted(EXPECTED_CHOICES))
def test_a_wrong_choice_names_the_key_and_lists_exactly_the_choices(key):
    method = LITERAL_SETTINGS[key]
    is_list = key == "method.layer_types"
    data = _config(method, key, ["linear", "bogus"] if is_list else "bogus")
    with pytest.raises(ConfigError) as caught:
        resolve_config(data)
    where = f"{key}[1]" if is_list else key
    assert str(caught.value) == f"{where}: unknown 'bogus' (choose from {EXPECTED_CHOICES[key]})"
    assert caught.value.exit_code == 2


@pytest.mark.parametrize("key", sorted(EXPECTED_CHOICES))
def test_every_choice_of_the_type_is_accepted_by_the_reader(key):
    table, _, name = key.partition(".")
    cls = _table_class(table, LITERAL_SETTINGS[key])
    hint = typing.get_type_hints(cls)[name]
    is_list = typing.get_origin(hint) is list
    (literal,) = typing.get_args(hint) if is_list else (hint,)
    assert ", ".join(typing.get_args(literal)) == EXPECTED_CHOICES[key]
    extra = {"dataset": "jsonl"} if table == "task" else {}  # the dataset that reads them all
    for choice in typing.get_args(literal):
        value = [choice] if is_list else choice
        assert getattr(from_dict(cls, {**extra, name: value}, table), name) == value


def _table_class(table: str, method: str) -> type:
    if table == "method":
        return _REGISTRY[method].cls.Options
    return typing.get_type_hints(ExperimentConfig)[table]


def test_a_wrong_choice_on_the_command_line_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "e.toml"
    path.write_text(Path(CONFIGS[0]).read_text())
    code = main(["run", str(path), "--quiet", "--set", "train.optimizer=adam"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == "floral: error: train.optimizer: unknown 'adam' (choose from sgd, adamw)"


def _message(key: str, value: str = "bogus") -> str:
    return f"{key}: unknown '{value}' (choose from {EXPECTED_CHOICES[key]})"


@pytest.mark.parametrize(
    ("check", "key"),
    [
        (lambda: check_local_optimizer(TrainConfig(optimizer="bogus")), "train.optimizer"),
        (lambda: check_local_optimizer(TrainConfig(lr_schedule="bogus")), "train.lr_schedule"),
        (lambda: ServerOptimizer(kind="bogus"), "train.server_optimizer"),
        (lambda: check_privacy(TrainConfig(dp_mode="bogus")), "train.dp_mode"),
        (lambda: check_engine_config(EngineConfig(name="bogus")), "engine.name"),
        (lambda: check_engine_config(EngineConfig(eval_clients="bogus")), "engine.eval_clients"),
        (lambda: check_attack(AttackConfig(kind="bogus")), "attack.kind"),  # type: ignore[arg-type]
        (lambda: check_dtype("bogus", torch.device("cpu")), "model.dtype"),
        (lambda: check_quantize("bogus", torch.device("cpu")), "model.quantize"),
        (lambda: check_router_mode("bogus"), "method.router"),
        (lambda: HetLoRA(HetLoRAOptions(aggregation="bogus")).build_model(None, None),
         "method.aggregation"),
        (lambda: validate_task(TaskConfig(shift="bogus")), "task.shift"),
        (lambda: validate_task(TaskConfig(dataset="jsonl", shift="none", template="bogus")),
         "task.template"),
        (lambda: validate_task(TaskConfig(dataset="jsonl", shift="none", group_field="g",
                                          group_split="bogus")), "task.group_split"),
        (lambda: validate_task(TaskConfig(dataset="jsonl", shift="none", bad_lines="bogus")),
         "task.bad_lines"),
    ],
)
def test_settings_built_in_code_get_the_same_message(check, key):
    with pytest.raises(ConfigError) as caught:
        check()
    assert str(caught.value) == _message(key)


# -- the dataset registry -------------------------------------------------------------------------

# A value of the right type, not the default, for every option beyond the common ones.
SAMPLES: dict[str, Any] = {
    "samples_per_client": 7, "test_fraction": 0.3, "data_dir": "/elsewhere",
    "dirichlet_alpha": 0.7, "classes_per_client": 3, "block_size": 8, "tokenizer": "bytes",
    "max_length": 9, "template": "plain", "generate_tokens": 3, "languages": ["de"],
    "catalogs": ["other"], "prompt_template": "T: {text}", "system": "Be brief.",
    "prompt_field": "q", "response_field": "a", "messages_field": "m", "client_field": "who",
    "cluster_field": "grp", "source": "hf:x", "split": "test", "group_field": "lang",
    "group_split": "per-value", "clusters": {"a": "b"}, "cluster_separator": "_",
    "bad_lines": "skip",
}
TASK_FIELDS = {f.name: f for f in dataclasses.fields(TaskConfig)}
SYNTHETIC_MLP_OPTIONS = (
    "dataset, shift, num_clients, num_clusters, data_fraction, min_samples, "
    "samples_per_client, test_fraction"
)
MNIST_OPTIONS = (
    "dataset, shift, num_clients, num_clusters, data_fraction, min_samples, data_dir, "
    "dirichlet_alpha, classes_per_client"
)


def test_samples_cover_every_option_with_a_value_that_is_not_its_default():
    assert set(SAMPLES) == set(TASK_FIELDS) - set(COMMON_OPTIONS)
    for name, value in SAMPLES.items():
        assert value != _default(name), name


def _default(name: str) -> Any:
    f = TASK_FIELDS[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _task(dataset: str, **options: Any) -> dict[str, Any]:
    return {"dataset": dataset, "shift": "none", "num_clients": 4, "num_clusters": 2, **options}


@pytest.mark.parametrize(
    ("dataset", "key", "options"),
    [
        ("synthetic-mlp", "block_size", SYNTHETIC_MLP_OPTIONS),
        ("synthetic-mlp", "data_dir", SYNTHETIC_MLP_OPTIONS),
        ("mnist", "test_fraction", MNIST_OPTIONS),  # mnist has its own test split
        ("mnist", "languages", MNIST_OPTIONS),
    ],
)
def test_an_option_of_another_dataset_is_refused_naming_the_dataset(dataset, key, options):
    data = {**BASE, "method": {"name": "floral"}, "task": _task(dataset, **{key: SAMPLES[key]})}
    with pytest.raises(ConfigError) as caught:
        resolve_config(data)
    assert str(caught.value) == (
        f"task.{key}: not an option of dataset '{dataset}' (its options: {options})"
    )
    assert caught.value.exit_code == 2


def test_an_unknown_key_lists_only_the_datasets_options():
    data = {**BASE, "method": {"name": "floral"},
            "task": _task("synthetic-mlp", rotate_degrees=90)}
    with pytest.raises(ConfigError) as caught:
        resolve_config(data)
    assert str(caught.value) == (
        "task.rotate_degrees: unknown key, not an option of dataset 'synthetic-mlp' "
        f"(its options: {SYNTHETIC_MLP_OPTIONS})"
    )


def test_an_unknown_dataset_lists_the_registered_ones():
    with pytest.raises(ConfigError) as caught:
        from_dict(TaskConfig, _task("mnits", block_size=8), "task")
    assert str(caught.value) == (
        f"task.dataset: unknown 'mnits' (choose from {', '.join(dataset_names())})"
    )


@pytest.mark.parametrize("dataset", dataset_names())
def test_each_dataset_refuses_every_option_it_does_not_declare(dataset):
    entry = dataset_entry(dataset)
    listed = ", ".join(entry.options)
    refused = [name for name in TASK_FIELDS if name not in entry.options]
    for name in refused:
        expected = f"task.{name}: not an option of dataset '{dataset}' (its options: {listed})"
        with pytest.raises(ConfigError) as caught:
            from_dict(TaskConfig, _task(dataset, **{name: SAMPLES[name]}), "task")
        assert str(caught.value) == expected
        # Built in code, the same setting stops before any data is read.
        with pytest.raises(ConfigError) as caught:
            validate_task(TaskConfig(**_task(dataset, **{name: SAMPLES[name]})))
        assert str(caught.value) == expected
    for name in entry.options:  # and takes every option it declares
        if name in SAMPLES:
            assert getattr(from_dict(TaskConfig, _task(dataset, **{name: SAMPLES[name]}),
                                     "task"), name) == SAMPLES[name]


def test_every_task_setting_is_some_datasets_option():
    declared = {name for d in dataset_names() for name in dataset_entry(d).options}
    assert declared == set(TASK_FIELDS)


def test_an_option_at_its_default_reads_back_whatever_the_dataset():
    # A results folder's config.toml lists every setting: it must resolve again.
    data = _task("mnist", block_size=_default("block_size"), languages=_default("languages"))
    assert from_dict(TaskConfig, data, "task").block_size == _default("block_size")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_and_its_resolved_form_load(path):
    config = load_config(path)
    again = resolve_config(json.loads(json.dumps(config.to_dict())))
    assert to_dict(again) == to_dict(config)


# -- declarations that do not lie: each dataset reads exactly the options it declares ------------


def _recording(reads: set[str], **options: Any) -> TaskConfig:
    """A TaskConfig that notes every setting read from it."""

    class Recorded(TaskConfig):
        def __getattribute__(self, name: str) -> Any:
            if name in TASK_FIELDS:
                reads.add(name)
            return super().__getattribute__(name)

    return Recorded(**options)


def _fake_images(name: str, data_dir: str = "", test_fraction: float = 0.2) -> ImageData:
    num_classes = 100 if name == "cifar100" else 10
    channels = 3 if name.startswith("cifar") else 1
    rng = np.random.default_rng(0)

    def split(per_class: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(num_classes), per_class)
        return rng.integers(0, 256, (len(y), channels, 8, 8)).astype(np.uint8), y

    (x_train, y_train), (x_test, y_test) = split(12), split(4)
    return ImageData(x_train, y_train, x_test, y_test, num_classes, 255.0, (0.5,) * channels,
                     (0.25,) * channels)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _rows() -> list[dict[str, Any]]:
    return [
        {"prompt": f"say {i}", "response": f"{i}", "client": f"c{i % 4}", "cluster": i % 2,
         "lang": ["de", "fr"][i % 2]}
        for i in range(32)
    ]


def _scenarios(dataset: str, tmp_path: Path) -> list[dict[str, Any]]:
    """Settings under which the dataset, together, reads everything it may read."""
    common = {"dataset": dataset, "num_clients": 4, "num_clusters": 2, "min_samples": 0}
    if dataset.startswith("synthetic"):
        return [{**common, "shift": "none"}]
    if dataset in ("mnist", "fashion-mnist", "mnist5k", "digits", "cifar10", "cifar100"):
        shifts = ["none", "rotate", "label-shift", "label-set", "dirichlet", "classes-per-client"]
        return [{**common, "shift": shift} for shift in shifts]
    text = {**common, "shift": "none", "tokenizer": "bytes", "test_fraction": 0.25}
    if dataset == "austen":
        return [{**text, "block_size": 8}]
    if dataset == "text":
        root = tmp_path / "text"
        root.mkdir()
        for name in ("de_a", "de_b", "fr_a", "fr_b"):
            (root / f"{name}.txt").write_text(f"{name} writes a line of text. " * 20)
        return [{**text, "data_dir": str(root), "block_size": 8, "cluster_separator": "_"}]
    prompted = {**text, "template": "plain", "max_length": 24}
    if dataset == "translations":
        return [{**prompted, "languages": ["de", "fr"], "max_length": 64}]
    assert dataset == "jsonl", f"no scenario for dataset {dataset!r}: add one"
    file = _write_jsonl(tmp_path / "rows.jsonl", _rows())
    return [
        {**prompted, "data_dir": str(file)},
        {**prompted, "data_dir": str(file), "group_field": "lang"},
        {**prompted, "source": "hf:rows", "group_field": "lang", "group_split": "per-value"},
    ]


@pytest.fixture
def offline_sources(monkeypatch):
    """The loaders that read files outside the test, replaced: what a dataset reads from its
    settings is the same either way."""
    import floral.data.instruct as instruct
    import floral.data.task as task
    import floral.llm.hf_data as hf_data
    from floral.data.text import AUSTEN_NOVELS

    monkeypatch.setattr(task, "load_source", _fake_images)
    line = "It is a truth universally acknowledged, that a single man must be in want."
    novels = {name: [line, ""] * 40 for name in AUSTEN_NOVELS}
    monkeypatch.setattr(task, "austen_novels", lambda data_dir="": novels)
    pool = [f"string {i}" for i in range(40)]

    def translation_pool(locale_dir, catalogs, languages):
        return pool, {lang: {s: f"{lang} {s}" for s in pool} for lang in languages}

    monkeypatch.setattr(instruct, "translation_pool", translation_pool)
    rows = [(f"hf:rows row {i}", row) for i, row in enumerate(_rows())]
    monkeypatch.setattr(hf_data, "load_rows", lambda spec, split: (rows, "hf:rows"))


@pytest.mark.parametrize("dataset", dataset_names())
def test_a_dataset_reads_exactly_the_options_it_declares(dataset, tmp_path, offline_sources):
    entry = dataset_entry(dataset)
    reads: set[str] = set()
    for options in _scenarios(dataset, tmp_path):
        validate_task(TaskConfig(**options))  # each scenario is a valid task
        cfg = _recording(reads, **options)
        entry.check(cfg)
        task = entry.build(cfg, 0)
        assert len(task.clients) == options["num_clients"]
    assert sorted(reads) == sorted(entry.options), (
        f"declared but never read: {sorted(set(entry.options) - reads)}; "
        f"read but not declared: {sorted(reads - set(entry.options))}"
    )


def test_the_recording_sees_a_read_that_a_declaration_omits(tmp_path, offline_sources):
    # What the test above relies on: a builder that reads one more setting is noticed.
    entry = dataset_entry("synthetic-mlp")
    reads: set[str] = set()
    cfg = _recording(reads, **_scenarios("synthetic-mlp", tmp_path)[0])
    entry.build(cfg, 0)
    _ = cfg.block_size
    assert "block_size" in reads and "block_size" not in entry.options


def test_build_task_refuses_a_setting_the_dataset_ignores():
    cfg = TaskConfig(dataset="synthetic-mlp", shift="none", num_clients=4, num_clusters=2,
                     block_size=8)
    with pytest.raises(ConfigError, match=r"^task\.block_size: not an option of dataset "
                                          r"'synthetic-mlp' \(its options: dataset, "):
        build_task(cfg, 0)
