"""Files the tests write, independently of floral's readers, and the configs that read them.

- IDX files of a Fashion-MNIST-like client, one folder per Flower node, and the federated task
  of those files assembled here (the nodes' data tests);
- R's XDR serialization: janeaustenr's gzipped .rda files and an installed package's lazy-load
  database (the Austen task);
- GNU .mo catalogs of two made-up languages and the translations task on them.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from floral.data import ClientData, FederatedTask, TaskConfig
from floral.data.text import AUSTEN_NOVELS

__all__ = [
    "COUNTRIES",
    "LANGUAGES",
    "NOVEL_LINES",
    "client_arrays",
    "expected_task",
    "translations_config",
    "write_idx",
    "write_lazyload",
    "write_locale",
    "write_mo",
    "write_node",
    "write_rda_folder",
]


# -- IDX files of a node's client -----------------------------------------------------------------
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST's, as published with the data set


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes (type 0x08), gzipped when the name ends in .gz."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def client_arrays(k: int, side: int = 28, labels: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + k)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (12 + k, side, side)),
        "train-labels-idx1-ubyte": rng.integers(0, labels, 12 + k),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (5, side, side)),
        "t10k-labels-idx1-ubyte": rng.integers(0, labels, 5),
    }


def write_node(folder: Path, arrays: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True)
    for name, array in arrays.items():
        write_idx(folder / name, array)
    return folder


def expected_task(clients: list[dict[str, np.ndarray]]) -> FederatedTask:
    """The federated task of the nodes' files, assembled here, independently of floral."""

    def images(a: np.ndarray) -> torch.Tensor:
        return ((torch.tensor(a, dtype=torch.float32) / 255 - MEAN) / STD)[:, None]

    data = []
    for k, arrays in enumerate(clients):
        x, y, xt, yt = arrays.values()
        data.append(ClientData(k, k % 2, images(x), torch.tensor(y), images(xt), torch.tensor(yt)))
    return FederatedTask("fashion-mnist", "classification", (1, 28, 28), 10, 2, data)


# -- a writer of R's XDR serialization, independent of the reader -------------------------------

UTF8_LEVELS = 1 << 3


def _i(value: int) -> bytes:
    return struct.pack(">i", value)


def _char(text: str | None) -> bytes:
    if text is None:
        return _i(9) + _i(-1)
    raw = text.encode("utf-8")
    return _i(9 | (UTF8_LEVELS << 12)) + _i(len(raw)) + raw


class _Writer:
    """Serializes strings, ints and named lists; the second use of a symbol is a reference."""

    def __init__(self) -> None:
        self.symbols: list[str] = []

    def symbol(self, name: str) -> bytes:
        if name in self.symbols:
            return _i(255 | ((self.symbols.index(name) + 1) << 8))
        self.symbols.append(name)
        return _i(1) + _char(name)

    def names_attribute(self, names: list[str]) -> bytes:
        return _i(2 | (1 << 10)) + self.symbol("names") + self.strings(names) + _i(254)

    def strings(self, values: list[str | None], names: list[str] | None = None) -> bytes:
        flags = 16 | ((1 << 9) if names else 0)
        body = _i(flags) + _i(len(values)) + b"".join(_char(v) for v in values)
        return body + (self.names_attribute(names) if names else b"")

    def ints(self, values: list[int]) -> bytes:
        return _i(13) + _i(len(values)) + b"".join(_i(v) for v in values)

    def named_list(self, items: dict[str, bytes]) -> bytes:
        return (_i(19 | (1 << 9)) + _i(len(items)) + b"".join(items.values())
                + self.names_attribute(list(items)))

    def pairlist(self, items: dict[str, bytes]) -> bytes:
        body = b"".join(_i(2 | (1 << 10)) + self.symbol(k) + v for k, v in items.items())
        return body + _i(254)


def _stream(body: bytes) -> bytes:
    return b"X\n" + _i(2) + _i(0x040201) + _i(0x020300) + body


NOVEL_LINES = {
    novel: [novel.upper(), "", f"Chapter 1 of {novel}", ""]
    + [f"{novel} line {i} ends the wrap" if i % 3 else "" for i in range(1, 300)]
    for novel in AUSTEN_NOVELS
}


def write_rda_folder(folder: Path) -> Path:
    """janeaustenr's source layout: one gzipped .rda per novel."""
    folder.mkdir(parents=True, exist_ok=True)
    for novel, lines in NOVEL_LINES.items():
        writer = _Writer()
        body = writer.pairlist({novel: writer.strings(lines)})
        (folder / f"{novel}.rda").write_bytes(gzip.compress(b"RDX2\n" + _stream(body)))
    return folder


def write_lazyload(folder: Path, objects: dict[str, list[str | None]]) -> Path:
    """An installed package's layout: Rdata.rdx (index) + Rdata.rdb (zlib records)."""
    folder.mkdir(parents=True, exist_ok=True)
    blob, where = b"", {}
    for name, values in objects.items():
        data = _stream(_Writer().strings(values))
        record = struct.pack(">I", len(data)) + zlib.compress(data)
        where[name] = (len(blob), len(record))
        blob += record
    writer = _Writer()
    variables = writer.named_list({n: writer.ints(list(w)) for n, w in where.items()})
    index = writer.named_list({
        "variables": variables,
        "references": writer.named_list({}),
        "compressed": _i(10) + _i(1) + _i(1),
    })
    (folder / "Rdata.rdb").write_bytes(blob)
    (folder / "Rdata.rdx").write_bytes(gzip.compress(_stream(index)))
    return folder / "Rdata"


# -- a writer of .mo files, independent of the reader ---------------------------------------------


def write_mo(path: Path, entries: dict[bytes, bytes], byte_order: str = "<",
             charset: str = "UTF-8") -> Path:
    """A GNU .mo file: header, then (original, translation) pairs sorted by original."""
    header = f"Content-Type: text/plain; charset={charset}\nLanguage: xx\n".encode("ascii")
    items = sorted({b"": header, **entries}.items())
    count = len(items)
    originals_at, translations_at = 28, 28 + 8 * count
    data_at = 28 + 16 * count
    blob, original_table, translation_table = b"", b"", b""
    for original, _ in items:
        original_table += struct.pack(f"{byte_order}2I", len(original), data_at + len(blob))
        blob += original + b"\x00"
    for _, translation in items:
        translation_table += struct.pack(f"{byte_order}2I", len(translation), data_at + len(blob))
        blob += translation + b"\x00"
    head = struct.pack(f"{byte_order}7I", 0x950412DE, 0, count, originals_at, translations_at,
                       0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(head + original_table + translation_table + blob)
    return path


COUNTRIES = ["Germany", "France", "Spain", "Italy", "Norway", "Peru", "Chile", "Japan", "Kenya",
             "Egypt", "Cuba", "Mali", "Oman", "Iran", "Iraq", "Fiji"]
# Two made-up languages: "up" writes the name in capitals, "rev" writes it backwards.
LANGUAGES = {"up": str.upper, "rev": lambda s: s[::-1]}


def write_locale(root: Path, catalog: str = "iso_3166-1") -> Path:
    for language, translate in LANGUAGES.items():
        entries = {name.encode(): translate(name).encode() for name in COUNTRIES}
        entries[b"Two\nlines"] = b"Zwei\nZeilen"  # multi-line strings are left out
        write_mo(root / language / "LC_MESSAGES" / f"{catalog}.mo", entries)
    return root


def translations_config(root: Path, **changes) -> TaskConfig:
    options = dict(dataset="translations", shift="none", num_clients=4, num_clusters=2,
                   languages=list(LANGUAGES), tokenizer="bytes", template="plain",
                   data_dir=str(root), max_length=32, test_fraction=0.25, min_samples=0,
                   generate_tokens=12)
    return TaskConfig(**{**options, **changes})
