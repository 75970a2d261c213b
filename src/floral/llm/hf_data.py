"""Rows of a Hugging Face `datasets` dataset, for tasks that read users' rows (`task.source =
"hf:<name, folder or file>"`): a folder written by `save_to_disk`, a data file (.json, .jsonl,
.csv, .parquet), or anything `datasets.load_dataset` takes (a folder of data files, or a hub
name when the hub is reachable).

Lives in floral.llm so that floral.data imports no optional package of the language-model
extra; `datasets` is imported on first use, and a missing one is a one-line error naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from floral.errors import ConfigError
from floral.llm.deps import require

__all__ = ["load_rows"]

# A data file's suffix -> the `datasets` builder that reads it.
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# What `save_to_disk` writes: a Dataset's state, or a DatasetDict's list of splits.
_SAVED = ("state.json", "dataset_dict.json")


def load_rows(spec: str, split: str) -> tuple[list[tuple[str, dict[str, Any]]], str]:
    """((where, row) for every row of split `split` of `spec`, a name of the dataset for
    messages); `where` is "hf:<spec>[<split>] row <i>", i the row's index in the split."""
    origin = f"hf:{spec}[{split}]"
    try:
        datasets = require("datasets")
    except ConfigError:
        raise ConfigError(
            f"task.source: {origin} needs the datasets package: pip install 'floral-lora[llm]'"
        ) from None
    path = Path(spec).expanduser()
    logging = datasets.utils.logging
    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # a bar per file read and split made: noise in a run's log
    try:
        if path.is_dir() and any((path / name).is_file() for name in _SAVED):
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise ConfigError(
                        f"task.split: {path} has no split {split!r} (it has {', '.join(data)})"
                    )
                data = data[split]
        elif path.is_file():
            builder = _BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise ConfigError(
                    f"task.source: {path}: datasets reads {', '.join(_BUILDERS)} "
                    "files, or a folder written by save_to_disk"
                )
            data = datasets.load_dataset(builder, data_files={split: str(path)}, split=split)
        else:
            data = datasets.load_dataset(spec, split=split)
    except ConfigError:
        raise
    except Exception as error:  # noqa: BLE001 - datasets raises many types, all the user's to fix
        message = " ".join(str(error).split())
        raise ConfigError(
            f"task.source: {origin}: {type(error).__name__}: {message:.300}"
        ) from None
    finally:
        if bars:
            logging.enable_progress_bar()
    if not isinstance(data, datasets.Dataset):
        raise ConfigError(
            f"task.source: {origin} is not one split of rows "
            f"({type(data).__name__}); name one with task.split"
        )
    return [(f"{origin} row {i}", row) for i, row in enumerate(data.to_list())], origin
