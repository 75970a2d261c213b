"""Users' own data beyond JSON lines: plain-text folders, rows split into clients by a column
(Dirichlet or one value per client), and Hugging Face `datasets` as a source (offline, on
files the tests write).

Expected values are computed here from the files' bytes (the bytes tokenizer is the identity
on UTF-8) or from the same seeded draws, not by calling the code under test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from floral.config import from_dict
from floral.data import TaskConfig, build_task
from floral.data.instruct import split_by_group
from floral.errors import ConfigError
from floral.train.objective import IGNORE_INDEX

# -- plain-text folders ----------------------------------------------------------------------------

TEXTS = {
    "de_alice": ["Der Hund schläft im Garten. " * 6, "Die Katze trinkt Milch. " * 5],
    "de_bob": ["Ein Vogel singt am Morgen. " * 8],
    "fr_carol": ["Le chat dort sur le lit. " * 9],
}


def write_text_folders(root: Path) -> Path:
    """One subfolder per client, each file a part of its text."""
    for client, parts in TEXTS.items():
        for i, part in enumerate(parts):
            path = root / client / f"part{i}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"  {part}\n\n")  # surrounding blank space is dropped
    return root


def text_config(root: Path, **changes) -> TaskConfig:
    options = dict(
        dataset="text",
        shift="none",
        num_clients=3,
        num_clusters=2,
        tokenizer="bytes",
        data_dir=str(root),
        block_size=16,
        test_fraction=0.25,
        min_samples=0,
        cluster_separator="_",
    )
    return TaskConfig(**{**options, **changes})


def expected_blocks(text: str, block_size: int, test_fraction: float):
    """(train, test) blocks of block_size + 1 bytes, each starting block_size after the last."""
    data = list(text.encode())
    count = (len(data) - 1) // block_size
    blocks = [data[i * block_size : i * block_size + block_size + 1] for i in range(count)]
    num_test = min(max(math.floor(count * test_fraction + 0.5), 1), count - 1)
    return blocks[: count - num_test], blocks[count - num_test :]


def test_text_folders_are_clients_cut_into_blocks(tmp_path):
    task = build_task(text_config(write_text_folders(tmp_path)), seed=0)
    assert task.kind == "causal-lm" and task.input_shape == (16,) and task.num_outputs == 256
    assert [c.cluster for c in task.clients] == [0, 0, 1]  # de, de, fr
    for client, parts in zip(task.clients, TEXTS.values(), strict=True):
        text = "\n\n".join(p.strip() for p in parts)
        train, test = expected_blocks(text, 16, 0.25)
        assert client.x_train.tolist() == [b[:-1] for b in train]
        assert client.y_train.tolist() == [b[1:] for b in train]
        assert client.x_test.tolist() == [b[:-1] for b in test]
        assert client.y_test.tolist() == [b[1:] for b in test]
        assert not (client.y_train == IGNORE_INDEX).any()  # every token of plain text counts


def test_text_files_are_clients_and_a_table_names_their_clusters(tmp_path):
    for name, parts in TEXTS.items():
        (tmp_path / f"{name}.txt").write_text("\n\n".join(parts))
    clusters = {"de_alice": "b", "de_bob": "a", "fr_carol": "a"}
    cfg = from_dict(
        TaskConfig,
        {**text_config(tmp_path).__dict__, "cluster_separator": "", "clusters": clusters},
        "task",
    )
    task = build_task(cfg, seed=0)
    assert [c.cluster for c in task.clients] == [1, 0, 0]  # labels in sorted order: a=0, b=1
    one = build_task(text_config(tmp_path, cluster_separator="", num_clusters=1), 0)
    assert [c.cluster for c in one.clients] == [0, 0, 0]
    train, _ = expected_blocks("\n\n".join(TEXTS["de_bob"]).strip(), 16, 0.25)
    assert one.clients[1].x_train.tolist() == [b[:-1] for b in train]


def test_a_cluster_table_value_of_the_wrong_type_names_its_key():
    with pytest.raises(ConfigError, match=r"task\.clusters\.alice: expected a string"):
        from_dict(TaskConfig, {"clusters": {"alice": 3}}, "task")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda root: (root / "de_bob" / "part0.txt").write_text(" \n"),
            r"de_bob/part0.txt: empty \(no text\)",
        ),
        (
            lambda root: (root / "de_bob" / "part0.txt").write_bytes(b"ok \xff\xfe"),
            r"de_bob/part0.txt: not UTF-8 text \(invalid start byte at byte 3\)",
        ),
        (lambda root: (root / "loose.txt").write_text("x"), r"both subfolders .* and \.txt files"),
        (
            lambda root: (root / "fr_carol" / "part0.txt").write_text("short"),
            r"fr_carol: client 'fr_carol' makes fewer than 2 blocks of 16 tokens",
        ),
        (
            lambda root: (root / "nobody").mkdir(),
            r"nobody: no \.txt file \(client 'nobody' is empty",
        ),
    ],
)
def test_bad_text_folders_are_one_line_errors_naming_the_file(tmp_path, change, message):
    root = write_text_folders(tmp_path / "data")
    change(root)
    with pytest.raises(ConfigError, match=message) as error:
        build_task(text_config(root), 0)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_clients": 4}, r"task.num_clients: .* holds 3 clients; set task.num_clients = 3"),
        ({"num_clusters": 3}, r"form 2 cluster\(s\) \(de, fr\); set task.num_clusters = 2"),
        ({"cluster_separator": "-"}, r"task.cluster_separator: client 'de_alice' .* has no '-'"),
        (
            {"cluster_separator": "", "clusters": {"de_alice": "x"}},
            r"task.clusters: client 'de_bob' .* has no cluster",
        ),
        ({"cluster_separator": "", "clusters": {"eve": "x"}}, r"task.clusters.eve: no client"),
        ({"clusters": {"de_alice": "x"}}, r"task.clusters: set it or task.cluster_separator"),
        ({"data_dir": ""}, r"task.data_dir: dataset \"text\" needs a folder"),
        ({"shift": "rotate"}, r"task.shift"),
    ],
)
def test_bad_text_settings_name_their_key(tmp_path, changes, message):
    root = write_text_folders(tmp_path)
    with pytest.raises(ConfigError, match=message) as error:
        build_task(text_config(root, **changes), 0)
    assert "\n" not in str(error.value)


# -- rows split into clients by a column --------------------------------------------------------


def counts(shares, codes, num_values):
    """(clients, values): how many rows of each value each client holds."""
    return np.stack([np.bincount(codes[s], minlength=num_values) for s in shares])


def test_dirichlet_split_matches_a_hand_computation_and_deals_every_row_once():
    rng = np.random.default_rng(7)
    groups = list(rng.choice(["de", "fr", "es"], size=300, p=[0.5, 0.3, 0.2]))
    shares, clusters, values = split_by_group(groups, 5, "dirichlet", 1.0, seed=11)
    assert values == ["de", "es", "fr"]
    codes = np.array([values.index(g) for g in groups])
    # Every row exactly once.
    assert sorted(np.concatenate(shares).tolist()) == list(range(300))
    # By hand: the first draw of the same generator, each value's rows cut at the rounded-down
    # cumulative shares.
    draw = np.random.default_rng([11, 0xD1C7]).dirichlet(np.ones(5), size=3)
    expected = np.zeros((5, 3), dtype=int)
    for v in range(3):
        total = int((codes == v).sum())
        cuts = np.floor(np.cumsum(draw[v]) * total + 1e-9).astype(int)
        expected[:, v] = np.diff(cuts, prepend=0)
    assert (counts(shares, codes, 3) == expected).all()
    assert clusters == expected.argmax(axis=1).tolist()  # a client's most common value
    # The same seed, the same split; another seed, another.
    again, _, _ = split_by_group(groups, 5, "dirichlet", 1.0, seed=11)
    assert all(np.array_equal(a, b) for a, b in zip(shares, again, strict=True))
    other, _, _ = split_by_group(groups, 5, "dirichlet", 1.0, seed=12)
    assert not all(np.array_equal(a, b) for a, b in zip(shares, other, strict=True))


def test_large_alpha_mixes_values_evenly_and_small_alpha_gives_one_value_per_client():
    groups = ["de"] * 400 + ["fr"] * 400 + ["it"] * 400
    codes = np.repeat(np.arange(3), 400)
    shares, _, _ = split_by_group(groups, 3, "dirichlet", 1e4, seed=0)
    mix = counts(shares, codes, 3)
    assert np.abs(mix - 400 / 3).max() < 15  # Dir(1e4) shares are 1/3 within about 1%
    for seed in range(3):
        shares, clusters, _ = split_by_group(groups, 3, "dirichlet", 1e-3, seed=seed)
        held = counts(shares, codes, 3)
        assert ((held > 0).sum(axis=1) == 1).all()  # one value per client ...
        assert sorted(clusters) == [0, 1, 2]  # ... and a different one each
        assert (held.max(axis=1) == 400).all()


def test_per_value_split_deals_each_values_rows_to_its_clients():
    groups = [1, 2, 3] * 10 + [3] * 6
    shares, clusters, values = split_by_group(groups, 5, "per-value", 1.0, seed=3)
    assert values == [1, 2, 3] and clusters == [0, 1, 2, 0, 1]
    codes = np.array([values.index(g) for g in groups])
    for share, cluster in zip(shares, clusters, strict=True):
        assert (codes[share] == cluster).all()
    assert [len(s) for s in shares] == [5, 5, 16, 5, 5]
    assert sorted(np.concatenate(shares).tolist()) == list(range(len(groups)))
    with pytest.raises(ConfigError, match="task.num_clients: 2 clients for 3 values"):
        split_by_group(groups, 2, "per-value", 1.0, seed=3)
    with pytest.raises(ConfigError, match="task.dirichlet_alpha: 0.001 leaves some of 6"):
        split_by_group(["a"] * 10 + ["b"] * 10, 6, "dirichlet", 1e-3, seed=0)


def write_lines(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


LANGUAGE_ROWS = [
    {"prompt": f"word {i}", "response": f"{lang}{i}", "language": lang}
    for i in range(24)
    for lang in ("de", "fr")
]


def rows_config(**changes) -> TaskConfig:
    options = dict(
        dataset="jsonl",
        shift="none",
        num_clients=4,
        num_clusters=2,
        tokenizer="bytes",
        template="plain",
        max_length=24,
        test_fraction=0.25,
        min_samples=0,
        group_field="language",
        dirichlet_alpha=0.3,
    )
    return TaskConfig(**{**options, **changes})


def responses(client) -> list[str]:
    train = [
        bytes(t for t in y.tolist() if t not in (IGNORE_INDEX, 0)).decode() for y in client.y_train
    ]
    return train + client.generation.references


def test_a_group_column_makes_the_clients_and_their_clusters(tmp_path):
    path = write_lines(tmp_path / "rows.jsonl", LANGUAGE_ROWS)
    task = build_task(rows_config(data_dir=str(path)), seed=5)
    groups = [r["language"] for r in LANGUAGE_ROWS]
    shares, clusters, _ = split_by_group(groups, 4, "dirichlet", 0.3, seed=5)
    seen = []
    for client, share, cluster in zip(task.clients, shares, clusters, strict=True):
        assert client.cluster == cluster
        assert sorted(responses(client)) == sorted(LANGUAGE_ROWS[i]["response"] for i in share)
        seen += responses(client)
    assert sorted(seen) == sorted(r["response"] for r in LANGUAGE_ROWS)
    per_value = build_task(rows_config(data_dir=str(path), group_split="per-value"), seed=5)
    for client in per_value.clients:
        language = ["de", "fr"][client.cluster]
        assert all(r.startswith(language) for r in responses(client))


@pytest.mark.parametrize(
    ("rows", "changes", "message"),
    [
        (
            [{"prompt": "a", "response": "b", "language": "de"}, {"prompt": "a", "response": "b"}],
            {},
            r"rows.jsonl:2: no 'language' \(task.group_field",
        ),
        (
            [{"prompt": "a", "response": "b", "language": "de"}] * 8,
            {"group_split": "random"},
            r"task.group_split: unknown 'random'",
        ),
        (
            LANGUAGE_ROWS,
            {"num_clusters": 3, "num_clients": 3},
            r"task.num_clusters: .* holds 2 cluster\(s\) \(column 'language'\)",
        ),
        (LANGUAGE_ROWS, {"dirichlet_alpha": 0.0}, r"task.dirichlet_alpha: must be > 0, got 0.0"),
    ],
)
def test_bad_group_settings_are_one_line_errors(tmp_path, rows, changes, message):
    path = write_lines(tmp_path / "rows.jsonl", rows)
    with pytest.raises(ConfigError, match=message) as error:
        build_task(rows_config(data_dir=str(path), **changes), 0)
    assert "\n" not in str(error.value)


def test_a_group_column_needs_one_file_not_a_folder(tmp_path):
    write_lines(tmp_path / "d" / "a.jsonl", LANGUAGE_ROWS)
    with pytest.raises(ConfigError, match="task.group_field: splits the rows of one file"):
        build_task(rows_config(data_dir=str(tmp_path / "d")), 0)


# -- Hugging Face datasets as a source ----------------------------------------------------------

CLIENT_ROWS = [{"prompt": f"q{i}", "response": f"a{i}", "client": f"c{i % 2}"} for i in range(12)]


def source_config(source: str, **changes) -> TaskConfig:
    options = dict(
        dataset="jsonl",
        shift="none",
        num_clients=2,
        num_clusters=1,
        tokenizer="bytes",
        template="plain",
        max_length=16,
        min_samples=0,
        source=source,
    )
    return TaskConfig(**{**options, **changes})


def test_a_missing_datasets_package_names_the_extra(tmp_path, monkeypatch):
    import floral.llm.hf_data as hf_data
    from floral.llm.deps import MissingExtraError

    def missing(module: str):
        raise MissingExtraError(f"{module} is not installed")

    monkeypatch.setattr(hf_data, "require", missing)
    with pytest.raises(
        ConfigError,
        match=r"needs the datasets package: pip install "
        r"'floral-lora\[llm\]'",
    ) as error:
        build_task(source_config(f"hf:{tmp_path}"), 0)
    assert "\n" not in str(error.value)


def test_source_settings_are_checked_before_loading(tmp_path):
    with pytest.raises(ConfigError, match=r"task.source: 'rows.jsonl': expected \"hf:"):
        build_task(source_config("rows.jsonl"), 0)
    with pytest.raises(ConfigError, match=r"task.source: set it or task.data_dir"):
        build_task(source_config("hf:x", data_dir=str(tmp_path)), 0)


def test_hf_source_gives_the_clients_that_the_same_jsonl_file_gives(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = write_lines(tmp_path / "rows.jsonl", CLIENT_ROWS)
    expected = build_task(source_config("", data_dir=str(path)), seed=2)
    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(CLIENT_ROWS),
            "other": datasets.Dataset.from_list(CLIENT_ROWS[:4]),
        }
    ).save_to_disk(str(saved))
    for source in (f"hf:{path}", f"hf:{saved}"):
        task = build_task(source_config(source), seed=2)
        for ours, theirs in zip(task.clients, expected.clients, strict=True):
            assert torch.equal(ours.x_train, theirs.x_train)
            assert torch.equal(ours.y_test, theirs.y_test)
    other = build_task(source_config(f"hf:{saved}", split="other"), seed=2)
    assert sum(len(c.x_train) + len(c.x_test) for c in other.clients) == 4
    grouped = build_task(
        source_config(
            f"hf:{path}",
            group_field="client",
            num_clients=2,
            num_clusters=2,
            group_split="per-value",
        ),
        seed=2,
    )
    assert [c.cluster for c in grouped.clients] == [0, 1]


def test_hf_source_errors_name_the_dataset_split_and_row(tmp_path):
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "saved"
    rows = [dict(r) for r in CLIENT_ROWS]
    rows[3]["response"] = ""
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    with pytest.raises(ConfigError, match=rf"hf:{saved}\[train\] row 3: 'response' is empty"):
        build_task(source_config(f"hf:{saved}"), 0)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(CLIENT_ROWS)}).save_to_disk(
        str(tmp_path / "dict")
    )
    with pytest.raises(ConfigError, match=r"task.split: .* has no split 'test' \(it has train\)"):
        build_task(source_config(f"hf:{tmp_path / 'dict'}", split="test"), 0)
    (tmp_path / "rows.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"task.source: .*rows.txt: datasets reads"):
        build_task(source_config(f"hf:{tmp_path / 'rows.txt'}"), 0)
    with pytest.raises(ConfigError, match=r"task.source: hf:.*missing\[train\]: FileNotFound"):
        build_task(source_config(f"hf:{tmp_path / 'missing'}"), 0)


# -- a run on users' text --------------------------------------------------------------------------


def test_a_floral_run_on_a_text_folder(tmp_path):
    pytest.importorskip("transformers")
    from floral.experiment import resolve_config
    from floral.run import run_experiment

    root = write_text_folders(tmp_path / "data")
    config = resolve_config(
        {
            "name": "own-text",
            "task": {k: v for k, v in text_config(root).__dict__.items() if k != "clusters"},
            "model": {"name": "tiny-llama"},
            "method": {
                "name": "floral",
                "rank": 2,
                "train_base": False,
                "bias": False,
                "include": ["*.q_proj", "*.v_proj"],
            },
            "train": {
                "rounds": 2,
                "clients_per_round": 1.0,
                "batch_size": 4,
                "lr": 0.01,
                "optimizer": "adamw",
            },
            "engine": {"eval_every": 2},
        }
    )
    summary = run_experiment(config, tmp_path / "out")
    assert summary.metric == "perplexity" and summary.rounds == 2
    assert 1.0 < summary.final["perplexity"] < 256
    assert {"perplexity_cluster0", "perplexity_cluster1", "router_ari"} <= set(summary.final)
