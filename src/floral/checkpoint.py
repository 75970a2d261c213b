"""Files that must not be lost or half-written: atomic writes and checkpoints with a manifest.

A checkpoint is a folder of files named by round (`state-R.safetensors`, `progress-R.json`) and
a `manifest.json` written last, by an atomic rename, that names them with their SHA-256 and
records the run's identity (its resolved config). Until the new manifest is in place the
previous one, and the files it names, stand untouched: a kill at any point of a write leaves
the previous good checkpoint. Files the manifest does not name are a partial write: reading
ignores them with a warning; the next write removes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from floral.config import tomllib
from floral.errors import ConfigError
from floral.train.state import aligned

__all__ = [
    "Checkpoint",
    "atomic_write_text",
    "json_safe",
    "load_tensors",
    "read_json",
    "read_toml",
    "save_tensors",
]

log = logging.getLogger("floral")
MANIFEST = "manifest.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` aside, then rename it into place: readers see the old file or the new."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """safetensors, written aside and renamed into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


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
        self.folder.mkdir(parents=True, exist_ok=True)
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
