"""A small reader of R's serialization format (XDR, versions 2 and 3), for the data files of
R packages: `.rds` (one object), `.rda`/`.RData` (named objects) and the lazy-load databases
(`Rdata.rdx` + `Rdata.rdb`) that an installed package keeps its data in.

It reads the values data sets are made of: NULL, logical, integer, double and character
vectors, lists, pairlists and symbols, with their attributes (so names come along). Anything
else (closures, environments, byte code) stops with a one-line error: it is not data.
"""

from __future__ import annotations

import builtins
import bz2
import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from floral.errors import FloralError

__all__ = ["RDataError", "RObject", "read_rds", "read_rda", "read_lazyload", "parse_serialized"]

# SEXP types (R Internals, "Serialization Formats").
NILSXP, SYMSXP, LISTSXP, CHARSXP, LGLSXP = 0, 1, 2, 9, 10
INTSXP, REALSXP, STRSXP, VECSXP, EXPRSXP, RAWSXP = 13, 14, 16, 19, 20, 24
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP = 255, 254, 253, 242, 241
NA_INTEGER = -(2**31)
_UTF8, _LATIN1 = 1 << 3, 1 << 2  # CHARSXP encoding flags in the `levels` bits


class RDataError(FloralError):
    """A file that is not R data this reader understands."""


@dataclass
class RObject:
    """A value with R attributes: `value` is a Python list (vectors) or dict (pairlists)."""

    value: Any
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str] | None:
        names = self.attributes.get("names")
        return names.value if isinstance(names, RObject) else names


def read_rds(path: str | Path) -> Any:
    """The single object of an `.rds` file (compressed or not)."""
    return parse_serialized(_decompress(Path(path).read_bytes()), str(path))


def read_rda(path: str | Path) -> dict[str, Any]:
    """Name -> object of an `.rda`/`.RData` file (as `save()` writes it)."""
    data = _decompress(Path(path).read_bytes())
    if data[:5] not in (b"RDX2\n", b"RDX3\n"):
        raise RDataError(f"{path}: not an R data file (no RDX2/RDX3 header)")
    pairs = parse_serialized(data[5:], str(path))
    if not isinstance(pairs, RObject) or not isinstance(pairs.value, dict):
        raise RDataError(f"{path}: expected a list of named objects")
    return dict(pairs.value)


def read_lazyload(stem: str | Path) -> dict[str, Any]:
    """Name -> object of a lazy-load database `<stem>.rdx` + `<stem>.rdb` (e.g. `data/Rdata`)."""
    stem = Path(stem)
    index = read_rds(stem.with_suffix(".rdx"))
    if not isinstance(index, RObject) or index.names is None or "variables" not in index.names:
        raise RDataError(f"{stem}.rdx: not a lazy-load index (no 'variables')")
    variables = index.value[index.names.index("variables")]
    blob = stem.with_suffix(".rdb").read_bytes()
    objects = {}
    for name, where in zip(variables.names or [], variables.value):
        offset, length = (where.value if isinstance(where, RObject) else where)[:2]
        chunk = _lazyload_chunk(blob[offset : offset + length], f"{stem}.rdb:{name}")
        objects[name] = parse_serialized(chunk, f"{stem}.rdb:{name}")
    return objects


def parse_serialized(data: bytes, source: str = "<bytes>") -> Any:
    """One object in R's XDR serialization format (starting at the `X\\n` marker)."""
    return _Reader(data, source).read_stream()


def _decompress(data: bytes) -> bytes:
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    return data


def _lazyload_chunk(chunk: bytes, source: str) -> bytes:
    """A lazy-load record: a 4-byte big-endian length, then zlib data, or a type byte
    (Z = zlib, 2 = bzip2, X = xz, 0 = none) before the compressed data."""
    if len(chunk) < 5:
        raise RDataError(f"{source}: truncated record")
    kind = chunk[4:5]
    if kind == b"Z":
        return zlib.decompress(chunk[5:])
    if kind == b"2":
        return bz2.decompress(chunk[5:])
    if kind == b"X":
        return lzma.decompress(chunk[5:])
    if kind == b"0":
        return chunk[5:]
    return zlib.decompress(chunk[4:])


class _Reader:
    def __init__(self, data: bytes, source: str) -> None:
        self.data, self.source, self.pos = data, source, 0
        self.refs: list[Any] = []

    def read_stream(self) -> Any:
        if self.data[:2] != b"X\n":
            what = "ASCII or native-binary" if self.data[:2] in (b"A\n", b"B\n") else "unknown"
            raise RDataError(f"{self.source}: {what} serialization; only XDR (X) is read")
        self.pos = 2
        version = self.int()
        self.int(), self.int()  # writer's and minimal reader's R versions
        if version == 3:
            self.take(self.int())  # the writer's native encoding
        elif version != 2:
            raise RDataError(f"{self.source}: serialization version {version} is not supported")
        return self.item()

    def take(self, size: int) -> bytes:
        if self.pos + size > len(self.data):
            raise RDataError(f"{self.source}: truncated at byte {self.pos}")
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    # From here on `int` in this class body is the method above, so annotations name the type
    # as builtins.int.
    def length(self) -> builtins.int:
        size = self.int()
        if size == -1:  # a long vector: two more ints
            upper, lower = self.int(), self.int()
            size = (upper << 32) + (lower & 0xFFFFFFFF)
        return size

    def item(self) -> Any:
        flags = self.int()
        kind, levels = flags & 0xFF, flags >> 12
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind == NILVALUE_SXP:
            return None
        if kind in (GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP):
            return RObject(f"<environment {kind}>")
        if kind == REFSXP:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == SYMSXP:
            symbol = self.item()
            self.refs.append(symbol)
            return symbol
        if kind == LISTSXP:
            return self.pairlist(has_attr, has_tag)
        if kind == CHARSXP:
            return self.string(levels)
        value = self.vector(kind)
        attributes = self.attributes() if has_attr else {}
        return RObject(value, attributes) if attributes else value

    def pairlist(self, has_attr: bool, has_tag: bool) -> RObject:
        """A pairlist, read iteratively along its CDRs (long ones would overflow recursion)."""
        value: dict[str, Any] = {}
        attributes: dict[str, Any] = {}
        while True:
            if has_attr:
                attributes.update(self.attributes())
            tag = self.item() if has_tag else f"[[{len(value) + 1}]]"
            value[str(tag)] = self.item()
            flags = self.int()
            if flags & 0xFF == NILVALUE_SXP:
                return RObject(value, attributes)
            if flags & 0xFF != LISTSXP:
                raise RDataError(f"{self.source}: a pairlist ends in type {flags & 0xFF}")
            has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))

    def attributes(self) -> dict[str, Any]:
        pairs = self.item()
        return dict(pairs.value) if isinstance(pairs, RObject) else {}

    def string(self, levels: builtins.int) -> str | None:
        size = self.int()
        if size == -1:
            return None  # NA_character_
        raw = self.take(size)
        return raw.decode("latin-1" if levels & _LATIN1 and not levels & _UTF8 else "utf-8",
                          errors="replace")

    def vector(self, kind: builtins.int) -> list[Any]:
        if kind in (STRSXP, VECSXP, EXPRSXP):
            return [self.item() for _ in range(self.length())]
        if kind in (LGLSXP, INTSXP):
            size = self.length()
            values = struct.unpack(f">{size}i", self.take(4 * size))
            return [None if v == NA_INTEGER else (bool(v) if kind == LGLSXP else v)
                    for v in values]
        if kind == REALSXP:
            size = self.length()
            return list(struct.unpack(f">{size}d", self.take(8 * size)))
        if kind == RAWSXP:
            return list(self.take(self.length()))
        if kind == NILSXP:
            return []
        raise RDataError(f"{self.source}: R type {kind} at byte {self.pos} is not data")
