"""Files that must not be lost or half-written: atomic writes and checkpoints with a manifest.

A checkpoint is a folder of files named by round (`state-R.safetensors`, `progress-R.json`) and
a `manifest.json` written last, by an atomic rename, that names them with their SHA-256 and
records the run's identity (its resolved config). Until the new manifest is in place the
previous one, and the files it names, stand untouched: a kill at any point of a write leaves
the previous good checkpoint. Files the manifest does not name are a partial write: reading
ignores them with a warning; the next write removes them.

Every write under a results folder goes through the helpers here (`atomic_write_text`,
`atomic_write_bytes`, `save_tensors`, `make_folder`, or a `writing` block): a write that fails
(a file in the way, no permission, a full disk) is a one-line `OutputError` naming the path, its
half-written copy removed and the file it would have replaced untouched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from floral.config import tomllib
from floral.errors import ConfigError, OutputError
from floral.train.state import aligned

__all__ = [
    "Checkpoint",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_writable",
    "json_safe",
    "load_tensors",
    "make_folder",
    "read_json",
    "read_toml",
    "save_tensors",
    "writing",
]

log = logging.getLogger("floral")
MANIFEST = "manifest.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` (UTF-8) aside, then rename it into place: readers see the old file or the
    new."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` aside, then rename it into place: readers see the old file or the new."""
    tmp = _aside(path)
    with writing(path, tmp):
        tmp.write_bytes(data)
        os.replace(tmp, path)


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """safetensors, written aside and renamed into place."""
    tmp = _aside(path)
    with writing(path, tmp):
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)


def make_folder(folder: Path) -> None:
    """`folder` and its parents, unless they are there."""
    with writing(folder):
        folder.mkdir(parents=True, exist_ok=True)


def check_writable(folder: Path) -> None:
    """Before any work: `folder` is a folder, or can be made one, where this process may write
    (what can be told without writing); else a one-line `OutputError`."""
    existing = _nearest(folder)
    if existing is not None and not existing.is_dir():
        raise OutputError(f"cannot write {folder}: {existing} is a file, not a folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {folder}: {existing} is not writable (permission denied)")


@contextmanager
def writing(path: Path, aside: Path | None = None) -> Iterator[None]:
    """Writes to `path` (a folder, or a file written aside to `aside`) in this block: one that
    fails ends in a one-line `OutputError` naming `path` and the problem, `aside` removed."""
    try:
        yield
    except (OSError, SafetensorError) as error:
        if aside is not None:
            with suppress(OSError):
                aside.unlink(missing_ok=True)
        folder = path if aside is None else path.parent
        raise OutputError(f"cannot write {path}: {_problem(folder, error)}") from None


def _aside(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _problem(folder: Path, error: Exception) -> str:
    """What went wrong, in words: a file where a folder should be, or the system's reason."""
    blocker = _file_in_the_way(folder)
    if blocker is not None:
        return f"{blocker} is a file, not a folder"
    if isinstance(error, OSError):
        return error.strerror or str(error)
    # safetensors' own I/O errors: "... I/O error: No space left on device (os error 28) ..."
    found = re.search(r"I/O error: (.+?) \(os error \d+\)", str(error))
    return found.group(1) if found else str(error)


def _file_in_the_way(folder: Path) -> Path | None:
    """The file (not a folder) at `folder` or at its nearest existing parent, if any."""
    existing = _nearest(folder)
    return existing if existing is not None and not existing.is_dir() else None


def _nearest(folder: Path) -> Path | None:
    """`folder` if it exists, else its nearest existing parent (None: none can be seen)."""
    try:
        return next((p for p in (folder, *folder.parents) if p.exists()), None)
    except OSError:  # a parent this process may not even look into
        return None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file; a missing or corrupt one is a one-line error naming it."""
    try:
        return aligned(load_file(str(path)))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (SafetensorError, OSError, ValueError) as error:
        raise ConfigError(f"{path}: not a readable safetensors file ({error})") from None


def read_json(path: Path) -> Any:
    """A JSON file; a missing or corrupt one is a one-line error naming it."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file; a missing or corrupt one is a one-line error naming it."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid TOML ({error})") from None


def json_safe(value: Any) -> Any:
    """`value` with non-finite floats as None: strict JSON has no NaN or Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Checkpoint:
    """The checkpoint folder of one results folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def exists(self) -> bool:
        return (self.folder / MANIFEST).is_file()

    def write(
        self, state: Mapping[str, torch.Tensor], progress: Mapping[str, Any],
        identity: Mapping[str, Any],
    ) -> None:
        """The state and progress of round `progress["round"]`, then the manifest naming them."""
        make_folder(self.folder)
        round_ = int(progress["round"])
        state_file, progress_file = f"state-{round_}.safetensors", f"progress-{round_}.json"
        save_tensors(state, self.folder / state_file)
        atomic_write_text(self.folder / progress_file, json.dumps(json_safe(dict(progress))))
        manifest = {
            "round": round_,
            "identity": dict(identity),
            "files": {name: _sha256(self.folder / name) for name in (state_file, progress_file)},
        }
        atomic_write_text(self.folder / MANIFEST, json.dumps(manifest, indent=1))
        for stray in self._strays(manifest):
            stray.unlink(missing_ok=True)

    def round(self) -> int:
        """The round the checkpoint holds."""
        return int(self._manifest()["round"])

    def identity(self) -> dict[str, Any]:
        """The identity the manifest records (the resolved config of the run that wrote it)."""
        return dict(self._manifest()["identity"])

    def read(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(state, progress), each file checked against the manifest's SHA-256."""
        manifest = self._manifest()
        for stray in self._strays(manifest):
            log.warning("%s: ignored, a partial checkpoint write (not in %s)", stray, MANIFEST)
        files = manifest["files"]
        for name, digest in files.items():
            path = self.folder / name
            if not path.is_file() or _sha256(path) != digest:
                raise ConfigError(
                    f"{path}: missing or changed since the checkpoint was written (corrupt?); "
                    f"delete {self.folder} to start afresh"
                )
        state_name, progress_name = sorted(files, key=lambda n: not n.endswith(".safetensors"))
        return load_tensors(self.folder / state_name), read_json(self.folder / progress_name)

    def _manifest(self) -> dict[str, Any]:
        path = self.folder / MANIFEST
        try:
            manifest = json.loads(path.read_text())
            missing = [key for key in ("round", "identity", "files") if key not in manifest]
            if missing:
                raise KeyError(missing[0])
            if not isinstance(manifest["files"], dict) or len(manifest["files"]) != 2:
                raise TypeError("'files' must name a state and a progress file")
        except FileNotFoundError:
            raise ConfigError(
                f"{self.folder}: no complete checkpoint ({MANIFEST} missing)"
            ) from None
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ConfigError(
                f"{path}: not a checkpoint manifest ({type(error).__name__}: {error}); "
                f"delete {self.folder} to start afresh"
            ) from None
        return dict(manifest)

    def _strays(self, manifest: Mapping[str, Any]) -> list[Path]:
        keep = {MANIFEST, *manifest["files"]}
        return sorted(p for p in self.folder.iterdir() if p.name not in keep)
