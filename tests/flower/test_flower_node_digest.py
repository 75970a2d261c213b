"""Data fingerprints: every node reports a digest of its data with its first reply, never the data.

A node with its own folder (`data-path`) reports the digest of the files it reads, each as
uncompressed: the same data gives the same digest on any node, whatever its partition-id,
cluster, shift or train/test split, and whatever the folder or the compression. The server
warns in one line when two nodes report the same digest, naming both partitions, and the run
folder's `nodes.json` records each client's digest, which the test computes again from the files
with hashlib alone (and with the shell pipeline the docs give).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from support.data import client_arrays, write_node  # noqa: E402
from support.flower import run_loopback, tiny_experiment  # noqa: E402

from floral.data import build_task  # noqa: E402
from floral.engines.flower.node_data import NodeData, data_digest  # noqa: E402
from floral.engines.flower.records import tensors_digest  # noqa: E402
from floral.experiment import resolve_config  # noqa: E402

SAME_DATA = "report the same data"


def _rows(seed: int, count: int = 50) -> bytes:
    rng = np.random.default_rng(seed)
    lines = [",".join(map(str, [*rng.integers(0, 256, 784), i % 10])) for i in range(count)]
    return ("\n".join(lines) + "\n").encode()


def _site(folder: Path, seed: int, gzipped: bool = True) -> Path:
    folder.mkdir(parents=True)
    raw = _rows(seed)
    if gzipped:
        (folder / "mnist_5k.csv.gz").write_bytes(gzip.compress(raw, mtime=seed))
    else:
        (folder / "mnist_5k.csv").write_bytes(raw)
    return folder


def _experiment() -> dict:
    # The deployment: mnist5k, a rotation per cluster, client k in cluster k mod 2.
    return {
        "name": "digests",
        "seed": 4,
        "task": {"dataset": "mnist5k", "shift": "rotate", "num_clients": 3, "num_clusters": 2,
                 "data_dir": "/nonexistent/the-server-has-no-data"},
        "model": {"name": "mlp", "hidden": [8]},
        "method": {"name": "fedavg"},
        "train": {"rounds": 1, "clients_per_round": 1.0, "batch_size": 8, "lr": 0.05},
    }


def _run(tmp_path: Path, folders: list[Path], caplog) -> tuple[list[str], dict]:
    nodes = {k: {"data-path": str(folder)} for k, folder in enumerate(folders)}
    config = resolve_config(_experiment())
    with caplog.at_level(logging.WARNING, logger="flwr.floral"):
        run_loopback(config, tmp_path / "run", node_configs=nodes)
    warned = [r.getMessage() for r in caplog.records if SAME_DATA in r.getMessage()]
    assert (tmp_path / "run" / "metrics.csv").is_file()
    return warned, json.loads((tmp_path / "run" / "nodes.json").read_text())


def files_digest_by_hand(files: list[Path]) -> str:
    """The digest as the docs define it, with hashlib alone."""
    each = []
    for path in files:
        raw = path.read_bytes()
        each.append(hashlib.sha256(gzip.decompress(raw) if path.suffix == ".gz" else raw)
                    .hexdigest())
    return hashlib.sha256("".join(f"{d}\n" for d in sorted(each)).encode()).hexdigest()


def test_two_nodes_on_one_folder_are_named_in_one_warning(tmp_path, caplog):
    shared, other = _site(tmp_path / "site0", 0), _site(tmp_path / "site2", 2)
    warned, recorded = _run(tmp_path, [shared, shared, other], caplog)
    # Partitions 0 and 1 are in clusters 0 and 1, rotated differently: the same data still.
    assert len(warned) == 1, warned
    assert warned[0].startswith("partition-id=0 (node 1000) and partition-id=1 (node 1001) "
                                f"{SAME_DATA} (digest ")
    assert "\n" not in warned[0]
    digests = {c["partition_id"]: c["data_digest"] for c in recorded["clients"]}
    assert digests[0] == digests[1] != digests[2]
    assert digests[0] == files_digest_by_hand([shared / "mnist_5k.csv.gz"])
    assert digests[2] == files_digest_by_hand([other / "mnist_5k.csv.gz"])


def test_different_data_gives_no_warning_and_the_run_folder_records_each_digest(
    tmp_path, caplog
):
    folders = [_site(tmp_path / f"site{k}", k, gzipped=k != 1) for k in range(3)]
    warned, recorded = _run(tmp_path, folders, caplog)
    assert warned == []
    files = [next(f.iterdir()) for f in folders]
    assert [c["partition_id"] for c in recorded["clients"]] == [0, 1, 2]
    assert [c["node_id"] for c in recorded["clients"]] == [1000, 1001, 1002]
    assert [c["data_digest"] for c in recorded["clients"]] == [
        files_digest_by_hand([f]) for f in files]
    assert recorded["left_out"] == []
    # The record holds digests, never data: it is small whatever the data.
    assert len((tmp_path / "run" / "nodes.json").read_bytes()) < 2000


def test_a_copy_of_the_data_elsewhere_uncompressed_is_the_same_data(tmp_path, caplog):
    first = _site(tmp_path / "site0", 0)
    copy = _site(tmp_path / "elsewhere" / "data", 0, gzipped=False)
    warned, _ = _run(tmp_path, [first, _site(tmp_path / "site1", 1), copy], caplog)
    assert len(warned) == 1 and warned[0].startswith(
        "partition-id=0 (node 1000) and partition-id=2 (node 1002) "), warned


def test_a_node_left_out_is_recorded_with_why(tmp_path, caplog):
    folders = [_site(tmp_path / f"site{k}", k) for k in range(3)]
    (folders[1] / "mnist_5k.csv.gz").write_bytes(b"")
    _, recorded = _run(tmp_path, folders, caplog)
    assert [c["partition_id"] for c in recorded["clients"]] == [0, 2]
    (left,) = recorded["left_out"]
    assert left["node_id"] == 1001
    assert left["reason"] == (f"the client failed: ConfigError: node data (partition-id=1) "
                              f"{folders[1] / 'mnist_5k.csv.gz'}: empty (no rows)")


def _jsonl(folder: Path) -> list[Path]:
    folder.mkdir()
    rows = [json.dumps({"prompt": f"say {i}", "response": str(i)}) for i in range(5)]
    (folder / "mine.jsonl").write_text("\n".join(rows) + "\n")
    return [folder / "mine.jsonl"]


def _idx(folder: Path) -> list[Path]:
    write_node(folder, client_arrays(0))
    return [folder / name for name in client_arrays(0)]


def _cifar100(folder: Path) -> list[Path]:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("train.bin", "test.bin.gz"):
        raw = rng.integers(0, 100, (4, 2 + 3072), dtype=np.uint8).tobytes()
        (folder / name).write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    (folder / "README").write_text("not data: not in the digest\n")
    return [folder / "train.bin", folder / "test.bin.gz"]


@pytest.mark.parametrize(("dataset", "write"), [
    ("jsonl", _jsonl), ("fashion-mnist", _idx), ("cifar100", _cifar100),
    ("mnist5k", lambda folder: [_site(folder, 0) / "mnist_5k.csv.gz"]),
])
def test_the_digest_of_each_format_is_the_files_digest_whatever_the_partition(
    tmp_path, dataset, write
):
    files = write(tmp_path / "site")
    expected = files_digest_by_hand(files)
    for k in (0, 3):
        assert data_digest(dataset, NodeData(str(tmp_path / "site"), k)) == expected
    if shutil.which("zcat") and shutil.which("sha256sum"):  # the shell pipeline of the docs
        quoted = " ".join(f"'{f}'" for f in files)
        shell = (f'for f in {quoted}; do zcat -f "$f" | sha256sum; done | cut -c1-64 '
                 "| LC_ALL=C sort | sha256sum | cut -c1-64")
        assert subprocess.run(["sh", "-c", shell], capture_output=True, text=True,
                              check=True).stdout.strip() == expected


def test_nodes_without_their_own_data_report_their_partitions_digest(tmp_path, caplog):
    config = resolve_config(tiny_experiment("fedavg", train={"rounds": 1}))
    with caplog.at_level(logging.WARNING, logger="flwr.floral"):
        run_loopback(config, tmp_path / "run")
    assert not [r for r in caplog.records if SAME_DATA in r.getMessage()]
    recorded = json.loads((tmp_path / "run" / "nodes.json").read_text())
    task = build_task(config.task, config.seed)
    assert [c["data_digest"] for c in recorded["clients"]] == [
        tensors_digest({"x_train": c.x_train, "y_train": c.y_train, "x_test": c.x_test,
                        "y_test": c.y_test}) for c in task.clients]
