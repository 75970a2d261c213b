"""A reader of GNU gettext `.mo` catalogs (the compiled message files under
`/usr/share/locale/<lang>/LC_MESSAGES/`), with the standard library only.

The format (GNU gettext manual, "The Format of GNU MO Files"): a magic number 0x950412de in
the file's byte order, a revision, the number of strings N, and the offsets of two tables of N
(length, offset) pairs, one for the original strings and one for their translations. An
original may carry a context (`msgctxt` + 0x04 + `msgid`) and a plural (`msgid` + 0x00 +
`msgid_plural`, its translation the forms joined by 0x00). The entry with an empty original is
the header, whose `Content-Type` names the charset.
"""

from __future__ import annotations

import struct
from pathlib import Path

from floral.errors import ConfigError

__all__ = ["MO_MAGIC", "read_mo"]

MO_MAGIC = 0x950412DE
_CONTEXT_SEPARATOR = b"\x04"


def read_mo(path: str | Path) -> dict[str, str]:
    """English string -> its translation: the singular form of plurals, contexts dropped (the
    first of several contexts wins), untranslated and empty entries left out."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 20:
        raise ConfigError(f"{path}: not a .mo catalog (too short)")
    for order in ("<", ">"):
        if struct.unpack(f"{order}I", data[:4])[0] == MO_MAGIC:
            break
    else:
        raise ConfigError(f"{path}: not a .mo catalog (bad magic number)")
    revision, count, originals, translations = struct.unpack(f"{order}4I", data[4:20])
    if revision >> 16 > 1:
        raise ConfigError(f"{path}: .mo revision {revision >> 16} is not supported")
    pairs = []
    for i in range(count):
        pairs.append((_string(data, order, originals, i, path),
                      _string(data, order, translations, i, path)))
    charset = "utf-8"
    for original, translated in pairs:
        if original == b"":
            charset = _charset(translated) or charset
    out: dict[str, str] = {}
    for original, translated in pairs:
        if not original or not translated:
            continue
        msgid = original.split(_CONTEXT_SEPARATOR, 1)[-1].split(b"\x00", 1)[0]
        msgstr = translated.split(b"\x00", 1)[0]
        if not msgid or not msgstr:
            continue
        try:
            key, value = msgid.decode(charset), msgstr.decode(charset)
        except (UnicodeDecodeError, LookupError):
            raise ConfigError(f"{path}: a string is not valid {charset}") from None
        out.setdefault(key, value)
    return out


def _string(data: bytes, order: str, table: int, index: int, path: Path) -> bytes:
    at = table + 8 * index
    if at + 8 > len(data):
        raise ConfigError(f"{path}: truncated .mo catalog (string table {index})")
    length, offset = struct.unpack(f"{order}2I", data[at : at + 8])
    if offset + length > len(data):
        raise ConfigError(f"{path}: truncated .mo catalog (string {index})")
    return data[offset : offset + length]


def _charset(header: bytes) -> str:
    for line in header.decode("ascii", "replace").splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-type" and "charset=" in value:
            return value.split("charset=", 1)[1].strip().split(";")[0] or ""
    return ""
