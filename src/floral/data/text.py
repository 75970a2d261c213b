"""Text tasks for causal language models: Jane Austen's six novels, one per cluster of clients.

Cluster c reads novel c (in publication order: Sense and Sensibility, Pride and Prejudice,
Mansfield Park, Emma, Northanger Abbey, Persuasion), so clusters differ in style, vocabulary
and characters: a real concept shift. The clients of one cluster split their novel into
contiguous parts; each client cuts its part into blocks of `block_size + 1` tokens (one token
overlapping the next block), the input being a block's first `block_size` tokens and the
target its last `block_size`. A client's last blocks (`test_fraction`) are its test set.

The novels come from the Debian package `r-cran-janeaustenr` (R's lazy-load data files, read
by `floral.data.rdata`), or from a folder of the package's `.rda` files (`task.data_dir`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import torch

from floral.data.partition import clients_of_cluster, keep_fraction
from floral.data.rdata import RObject, read_lazyload, read_rda
from floral.errors import ConfigError, DatasetNotFoundError

__all__ = [
    "AUSTEN_DIR",
    "AUSTEN_NOVELS",
    "TEXT_DATASETS",
    "ByteTokenizer",
    "Tokenizer",
    "austen_novels",
    "load_tokenizer",
    "novel_text",
    "read_utf8",
    "token_blocks",
]

TEXT_DATASETS: tuple[str, ...] = ("austen",)
AUSTEN_NOVELS: tuple[str, ...] = (
    "sensesensibility",
    "prideprejudice",
    "mansfieldpark",
    "emma",
    "northangerabbey",
    "persuasion",
)
AUSTEN_DIR = "/usr/lib/R/site-library/janeaustenr/data"


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int  # ends every response (prompt/response tasks)
    pad_id: int  # fills examples up to task.max_length
    has_chat_template: bool

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256): no download, no dependency; for tests. Byte 0
    (NUL, never in text) ends a response and pads; there is no chat template."""

    vocab_size = 256
    eos_id = 0
    pad_id = 0
    has_chat_template = False

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 < i < 256).decode("utf-8", errors="replace")

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        raise ConfigError("task.template: the bytes tokenizer has no chat template (use "
                          "template = \"plain\", or a model's tokenizer)")


def load_tokenizer(name: str) -> Tokenizer:
    """`bytes`, or a pretrained model's tokenizer (`smollm2`, `hf:<folder or .gguf>`)."""
    if name == "bytes":
        return ByteTokenizer()
    from floral.llm.model import load_tokenizer as load_pretrained  # needs transformers

    return load_pretrained(name)


def austen_novels(data_dir: str = "") -> dict[str, list[str]]:
    """Novel name -> its lines (as janeaustenr stores them: one string per printed line)."""
    folder = Path(data_dir or AUSTEN_DIR)
    if (folder / "Rdata.rdx").is_file():
        objects = read_lazyload(folder / "Rdata")
    else:
        objects = {}
        for novel in AUSTEN_NOVELS:
            if (folder / f"{novel}.rda").is_file():
                objects.update(read_rda(folder / f"{novel}.rda"))
    missing = [n for n in AUSTEN_NOVELS if n not in objects]
    if missing:
        raise DatasetNotFoundError(
            f"austen: {', '.join(missing)} not found in {folder}: apt-get install "
            "--no-install-recommends r-cran-janeaustenr, or set task.data_dir to a folder of "
            "janeaustenr's .rda files"
        )
    return {n: _lines(objects[n], n) for n in AUSTEN_NOVELS}


def _lines(value: object, name: str) -> list[str]:
    lines = value.value if isinstance(value, RObject) else value
    if not isinstance(lines, list) or not all(x is None or isinstance(x, str) for x in lines):
        raise ConfigError(f"austen: {name} is not a character vector")
    return [x or "" for x in lines]


def novel_text(lines: Sequence[str]) -> list[str]:
    """The novel's paragraphs: runs of non-empty lines joined by spaces (lines are the
    printed edition's hard wraps, not the author's)."""
    paragraphs, current = [], []
    for line in lines:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return paragraphs


def split_parts(paragraphs: Sequence[str], num_parts: int) -> list[list[str]]:
    """Contiguous runs of paragraphs of about equal length in characters."""
    sizes = [len(p) + 2 for p in paragraphs]
    total = sum(sizes)
    parts: list[list[str]] = [[] for _ in range(num_parts)]
    done = 0
    for paragraph, size in zip(paragraphs, sizes):
        parts[min(num_parts - 1, done * num_parts // max(total, 1))].append(paragraph)
        done += size
    return parts


def token_blocks(tokens: Sequence[int], block_size: int) -> torch.Tensor:
    """(n, block_size + 1) blocks; block i starts at token i * block_size."""
    count = max(0, (len(tokens) - 1) // block_size)
    ids = torch.tensor(list(tokens[: count * block_size + 1]), dtype=torch.long)
    if count == 0:
        return ids.new_empty(0, block_size + 1)
    return ids.unfold(0, block_size + 1, block_size)


def encode_prefix(tokenizer: Tokenizer, paragraphs: Sequence[str], num_tokens: int) -> list[int]:
    """The tokens of the first paragraphs, enough for `num_tokens` (0 = all of them).

    Tokenizes a growing prefix rather than the whole part: a novel is hundreds of thousands
    of tokens, a run needs a few thousand per client.
    """
    text = "\n\n".join(paragraphs)
    if num_tokens <= 0:
        return tokenizer.encode(text)
    size = num_tokens * 6  # English averages 4-5 characters per token
    while True:
        tokens = tokenizer.encode(text[:size])
        if len(tokens) > num_tokens or size >= len(text):
            return tokens[: num_tokens + 1] if len(tokens) > num_tokens else tokens
        size *= 2


def client_blocks(
    paragraphs: Sequence[str], tokenizer: Tokenizer, block_size: int, max_blocks: int,
    test_fraction: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) blocks of one client's part of a novel."""
    tokens = encode_prefix(tokenizer, paragraphs, max_blocks * block_size)
    blocks = token_blocks(tokens, block_size)
    if len(blocks) < 2:
        return blocks, blocks[:0]  # too short to hold out a test block: the caller says so
    num_test = math.floor(len(blocks) * test_fraction + 0.5)
    num_test = min(max(num_test, 1), len(blocks) - 1)
    return blocks[: len(blocks) - num_test], blocks[len(blocks) - num_test :]


def cluster_parts(
    novels: dict[str, list[str]], num_clients: int, num_clusters: int
) -> list[tuple[int, list[str]]]:
    """(cluster, paragraphs) of every client: cluster c's clients share novel c."""
    parts: list[tuple[int, list[str]] | None] = [None] * num_clients
    for cluster in range(num_clusters):
        members = clients_of_cluster(cluster, num_clients, num_clusters)
        paragraphs = novel_text(novels[AUSTEN_NOVELS[cluster]])
        for k, part in zip(members, split_parts(paragraphs, len(members))):
            parts[k] = (cluster, part)
    return parts  # type: ignore[return-value]  # every client is in one cluster


def trim_train(blocks: torch.Tensor, fraction: float, min_samples: int) -> torch.Tensor:
    """The first blocks kept by `task.data_fraction` (contiguous text, so no shuffle)."""
    keep = len(keep_fraction(torch.arange(len(blocks)).numpy(), fraction, min_samples))
    return blocks[:keep]


def read_utf8(file: Path) -> str:
    """A user's text file; one that is not UTF-8 is a one-line error naming the byte."""
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{file}: not UTF-8 text ({error.reason} at byte {error.start})"
        ) from None
