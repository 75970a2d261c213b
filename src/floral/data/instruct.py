"""Prompt/response tasks for causal language models: users' own JSON-lines files, and UI
translation catalogs (a real multilingual concept shift).

An example is a prompt and a response. It is rendered as text (`template`): by the
tokenizer's chat template (a user turn, then the assistant's; a `messages` list as it stands),
or plainly as `prompt + "\\n"` followed by the response and the end-of-sequence token. The
tokens of prompt + response (at most `max_length`) are padded on the right to `max_length`;
the input is the sequence less its last token, the target the sequence moved by one, with
every target inside the prompt and every padding target set to IGNORE_INDEX: the loss, and so
the gradient, comes from the response tokens only. Causal attention means the padding on the
right changes nothing before it, so no attention mask is needed in training.

Evaluation adds greedy generation from each held-out prompt (`GenerationData`): the text
generated, up to the end-of-sequence token or `generate_tokens` new tokens, against the
reference response, by chrF and exact match (floral.train.text_metrics).

Translations (`dataset = "translations"`): GNU gettext catalogs of Debian packages, one target
language per cluster. The English strings present in every chosen language form one pool; a
seeded `test_fraction` of it is held out from every client, and the clients of a cluster split
the rest (and the held-out strings) between them. The prompt holds the English string and never
names the language, so the same prompt has a different answer in every cluster.

JSON lines (`dataset = "jsonl"`): `data_dir` is a folder with one `*.jsonl` file per client
(in name order), or one `.jsonl` file whose `client_field` says whose each line is. A line is
an object with `prompt_field` and `response_field` strings, or a `messages_field` list of
{"role", "content"} ending with the assistant's turn (loss on that last turn only). An optional
`cluster_field` gives each client's true cluster (constant per client). Or, with
`group_field`, the rows of one file are split into `num_clients` clients by that column's values
(`split_by_group`: Dirichlet shares per value, or one value per client), each value a cluster.
`source = "hf:..."` reads the rows from a Hugging Face dataset instead (floral.llm.hf_data),
"where" in messages then being its split and row index. A seeded `test_fraction` of each
client's examples is held out. A line (row) that is not a usable example is a bad line: all of
a source's bad lines are named in one error (the first `BAD_LINES_SHOWN` and the count), or,
with `bad_lines = "skip"`, left out with a warning and counted (`BadLines`).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from torch import nn

from floral.config import choices
from floral.data.mo import read_mo
from floral.data.partition import clients_of_cluster, dirichlet_proportions, split_by_proportions
from floral.data.text import Tokenizer, read_utf8
from floral.errors import ConfigError, DatasetNotFoundError
from floral.train.device import Placement
from floral.train.objective import IGNORE_INDEX
from floral.train.text_metrics import generation_sums

__all__ = [
    "BAD_LINES",
    "CATALOG_PACKAGES",
    "BadLines",
    "BadLinesPolicy",
    "LOCALE_DIR",
    "TEMPLATES",
    "GroupSplit",
    "Template",
    "Example",
    "GenerationData",
    "TextGeneration",
    "encode_examples",
    "read_jsonl",
    "render",
    "translation_pool",
]

LOCALE_DIR = "/usr/share/locale"
HF_PREFIX = "hf:"  # task.source: a Hugging Face dataset
Template = Literal["auto", "chat", "plain"]
TEMPLATES: tuple[str, ...] = choices(Template)
# The Debian package that installs each catalog under /usr/share/locale/<lang>/LC_MESSAGES/.
CATALOG_PACKAGES = {
    "iso_3166-1": "iso-codes",
    "iso_639-2": "iso-codes",
    "glib20": "libglib2.0-data",
    "gtk20": "libgtk2.0-common",
    "gtk30": "libgtk-3-common",
}
log = logging.getLogger("floral")
_T = TypeVar("_T")


@dataclass(frozen=True)
class Example:
    """A conversation whose last message is the response to learn and to generate."""

    messages: tuple[tuple[str, str], ...]  # (role, content), the last one the assistant's

    @classmethod
    def pair(cls, prompt: str, response: str) -> Example:
        return cls((("user", prompt), ("assistant", response)))

    @property
    def response(self) -> str:
        return self.messages[-1][1]

    @property
    def source(self) -> str:
        return self.messages[-2][1]


@dataclass
class GenerationData:
    """A client's held-out prompts (token ids, as in training) and their reference responses."""

    prompts: list[list[int]]
    references: list[str]
    # What each prompt asks, as written before rendering (translations: the English string;
    # jsonl: the last message before the response).
    sources: list[str] = field(default_factory=list)


@dataclass
class TextGeneration:
    """How a task's clients are evaluated by generating text: greedily, up to `max_new_tokens`
    or the end-of-sequence token, decoded by the task's tokenizer."""

    tokenizer: Tokenizer
    max_new_tokens: int
    template: str  # chat | plain: how `prompt_ids` renders a new prompt
    system: str = ""  # task.system
    prompt_template: str = "{text}"  # translations: task.prompt_template

    def prompt_ids(self, prompt: str) -> list[int]:
        """A new prompt as the clients were trained to see it (for translations, `prompt` is
        the English string)."""
        example = with_system(Example.pair(self.prompt_template.format(text=prompt), "-"),
                              self.system)
        return render_prompt(self.tokenizer, self.template, example.messages[:-1])

    def generate(
        self, model: nn.Module, prompts: Sequence[Sequence[int]], placement: Placement | None
    ) -> list[str]:
        from floral.llm.generate import greedy_generate

        ids = greedy_generate(
            model, prompts, eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
            max_new_tokens=self.max_new_tokens, placement=placement,
        )
        return [self.tokenizer.decode(x).strip() for x in ids]

    def sums(
        self, model: nn.Module, data: GenerationData, placement: Placement | None = None
    ) -> dict[str, float]:
        """chrF statistics and exact matches of the client's generations, summable."""
        return generation_sums(self.generate(model, data.prompts, placement), data.references)


# -- rendering ------------------------------------------------------------------------------


def with_system(example: Example, system: str) -> Example:
    """The example with a system message first (`task.system`), unless empty or one is there."""
    if not system or example.messages[0][0] == "system":
        return example
    return Example((("system", system), *example.messages))


def resolve_template(template: str, tokenizer: Tokenizer) -> str:
    """`auto` -> chat when the tokenizer has a chat template, else plain."""
    if template == "auto":
        return "chat" if tokenizer.has_chat_template else "plain"
    if template == "chat" and not tokenizer.has_chat_template:
        raise ConfigError("task.template: 'chat' needs a tokenizer with a chat template; this "
                          "one has none (use template = \"plain\")")
    return template


def _chat(messages: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in messages]


def render_prompt(
    tokenizer: Tokenizer, template: str, messages: Sequence[tuple[str, str]]
) -> list[int]:
    """The prompt's tokens, ending where the response begins."""
    if template == "chat":
        return tokenizer.encode(tokenizer.render_chat(_chat(messages), add_generation_prompt=True))
    turns = [content for role, content in messages if role != "system"]
    if len(turns) != 1:
        raise ConfigError("task.template: a conversation of several turns (messages) needs "
                          "template = \"chat\" and a tokenizer with a chat template")
    system = "".join(content + "\n" for role, content in messages if role == "system")
    return tokenizer.encode(system + turns[0] + "\n")


def render(tokenizer: Tokenizer, template: str, example: Example) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of an example; the response ends with the end token."""
    prompt = render_prompt(tokenizer, template, example.messages[:-1])
    if template == "chat":
        before = tokenizer.render_chat(_chat(example.messages[:-1]), add_generation_prompt=True)
        full = tokenizer.render_chat(_chat(example.messages), add_generation_prompt=False)
        if not full.startswith(before):
            raise ConfigError("task.template: the chat template does not write a conversation "
                              "as its prompt followed by the answer; use template = \"plain\"")
        response = tokenizer.encode(full[len(before):])
    else:
        response = tokenizer.encode(example.response)
    if tokenizer.eos_id not in response:
        response.append(tokenizer.eos_id)
    return prompt, response


def encode_examples(
    tokenizer: Tokenizer, template: str, examples: Sequence[Example], max_length: int,
    drop_long: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, list[list[int]], list[int]]:
    """(x, y, prompts, kept): inputs and targets of shape (n, max_length), each example's
    prompt ids, and the indices of the examples kept.

    An example longer than `max_length` is dropped (`drop_long`) or cut: its response first,
    down to one token, then its prompt from the left."""
    rows: list[tuple[list[int], list[int]]] = []
    kept: list[int] = []
    cut = 0
    for i, example in enumerate(examples):
        prompt, response = render(tokenizer, template, example)
        if len(prompt) + len(response) > max_length:
            if drop_long:
                continue
            cut += 1
            response = response[: max(1, max_length - len(prompt))]
            prompt = prompt[len(prompt) + len(response) - max_length:]
        rows.append((prompt, response))
        kept.append(i)
    if cut:
        log.warning("%d of %d examples are longer than task.max_length = %d tokens and were cut",
                    cut, len(examples), max_length)
    x = torch.full((len(rows), max_length), tokenizer.pad_id, dtype=torch.long)
    y = torch.full((len(rows), max_length), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, response) in enumerate(rows):
        sequence = torch.tensor(prompt + response, dtype=torch.long)
        length = len(sequence) - 1
        x[i, :length] = sequence[:-1]
        y[i, :length] = sequence[1:]
        y[i, : len(prompt) - 1] = IGNORE_INDEX  # targets inside the prompt: no loss
    return x, y, [prompt for prompt, _ in rows], kept


# -- translations ---------------------------------------------------------------------------


def translation_pool(
    locale_dir: str, catalogs: Sequence[str], languages: Sequence[str]
) -> tuple[list[str], dict[str, dict[str, str]]]:
    """(English strings translated in every language, language -> {English: translation}).

    Strings that span several lines are left out; with several catalogs the first one that
    translates a string gives its translation."""
    root = Path(locale_dir or LOCALE_DIR)
    tables: dict[str, dict[str, str]] = {}
    for language in languages:
        table: dict[str, str] = {}
        for catalog in catalogs:
            path = root / language / "LC_MESSAGES" / f"{catalog}.mo"
            if not path.is_file():
                package = CATALOG_PACKAGES.get(catalog)
                how = f"apt-get install {package}" if package else "install the package that has it"
                raise DatasetNotFoundError(
                    f"task.catalogs: {path} not found: {how}, or set task.data_dir to a folder "
                    "of <language>/LC_MESSAGES/<catalog>.mo files"
                )
            for source, target in read_mo(path).items():
                table.setdefault(source, target)
        tables[language] = table
    common = set.intersection(*(set(t) for t in tables.values())) if tables else set()
    pool = sorted(s for s in common if "\n" not in s and s.strip())
    return pool, tables


def split_pool(pool: Sequence[str], test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train pool, held-out pool): a seeded permutation, its first `test_fraction` held out."""
    order = np.random.default_rng([seed, 0x7E57]).permutation(len(pool))
    num_test = min(max(1, math.floor(test_fraction * len(pool) + 0.5)), len(pool) - 1)
    shuffled = [pool[i] for i in order]
    return shuffled[num_test:], shuffled[:num_test]


def cluster_shares(
    items: Sequence[str], num_clients: int, num_clusters: int
) -> dict[int, list[str]]:
    """Client -> its part of `items`: the clients of each cluster split them in order."""
    shares: dict[int, list[str]] = {}
    for cluster in range(num_clusters):
        members = clients_of_cluster(cluster, num_clients, num_clusters)
        for k, part in zip(members, np.array_split(np.arange(len(items)), len(members)),
                           strict=True):
            shares[k] = [items[i] for i in part]
    return shares


# -- JSON lines ------------------------------------------------------------------------------


@dataclass
class JsonlClient:
    name: str  # the file's name, or the client column's value
    where: str  # the file (and line) that introduced it, for messages
    examples: list[Example]
    cluster: Any = None  # the cluster column's value, if any


@dataclass(frozen=True)
class JsonlFields:
    prompt: str = "prompt"
    response: str = "response"
    messages: str = "messages"
    client: str = "client"
    cluster: str = "cluster"


BadLinesPolicy = Literal["error", "skip"]
BAD_LINES: tuple[str, ...] = choices(BadLinesPolicy)
BAD_LINES_SHOWN = 10  # a report of bad lines names this many and counts the rest


class BadLines:
    """The problems of single lines (rows) of a source, gathered so that all are reported at
    once: `policy` "error" stops with one line naming the first `BAD_LINES_SHOWN` and the
    count; "skip" leaves those lines out, says so in a warning, and counts them."""

    def __init__(self, policy: str = "error") -> None:
        self.policy = policy
        self.found: list[tuple[str, str]] = []  # (where, what is wrong)

    def check(self, where: str, step: Callable[[], _T]) -> _T | None:
        """`step()`, or None when it finds the line bad (a ConfigError that names `where`)."""
        try:
            return step()
        except ConfigError as error:
            self.found.append((where, str(error).removeprefix(f"{where}: ")))
            return None

    def add(self, where: str, problem: str) -> None:
        self.found.append((where, problem))

    @property
    def count(self) -> int:
        return len(self.found)

    def settle(self, origin: str) -> int:
        """Stop on the bad lines (policy "error"), or warn and return how many were left out;
        `origin` is the file, folder or dataset they came from."""
        if not self.found:
            return 0
        self.found.sort(key=lambda item: _position(item[0]))  # in the order of the lines
        count = len(self.found)
        shown = "; ".join(f"{_short(where, origin)}: {problem}"
                          for where, problem in self.found[:BAD_LINES_SHOWN])
        more = f"; and {count - BAD_LINES_SHOWN} more" if count > BAD_LINES_SHOWN else ""
        lines = "1 bad line" if count == 1 else f"{count} bad lines"
        if self.policy == "error":
            if count == 1:  # as an editor reads it: file:line: what is wrong
                where, problem = self.found[0]
                raise ConfigError(f"{where}: {problem} (1 bad line; fix it, or set "
                                  "task.bad_lines = \"skip\" to leave it out)")
            raise ConfigError(f"{origin}: {lines} ({shown}{more}); fix them, or set "
                              "task.bad_lines = \"skip\" to leave them out")
        log.warning("%s: left out %s (task.bad_lines = \"skip\"): %s%s", origin, lines, shown,
                    more)
        return count


def _position(where: str) -> tuple[str, int]:
    """A line's file (or dataset) and number, to sort by: "a.jsonl:12" -> ("a.jsonl:", 12)."""
    found = re.search(r"(\d+)$", where)
    return (where[: found.start()], int(found[1])) if found else (where, 0)


def _short(where: str, origin: str) -> str:
    """`where` without the origin every line shares: "line 4", "row 7", "b.jsonl:2"."""
    if where.startswith(origin + ":"):
        return "line " + where[len(origin) + 1:]
    if where.startswith(origin + " "):
        return where[len(origin) + 1:]
    folder = origin.rstrip("/") + "/"
    return where[len(folder):] if where.startswith(folder) else where


def read_jsonl(path: str, fields: JsonlFields, bad: BadLines | None = None) -> list[JsonlClient]:
    """The clients of a folder of `*.jsonl` files (one per client) or of one `.jsonl` file with
    a client column. Bad lines go to `bad` (none given: they stop the reading, named
    together), settled here; every other problem is a one-line error naming the file."""
    root = _jsonl_path(path)
    bad = BadLines() if bad is None else bad
    if root.is_dir():
        files = sorted(root.glob("*.jsonl"))
        if not files:
            raise ConfigError(f"task.data_dir: {root} holds no *.jsonl file")
        clients = []
        for file in files:
            client = JsonlClient(file.stem, str(file), [])
            for where, row in _rows(file, bad):
                bad.check(where, partial(_add_example, client, row, fields, where))
            clients.append(client)
        bad.settle(str(root))
        for client in clients:
            if not client.examples:
                raise ConfigError(f"{client.where}: no examples (client {client.name!r} is "
                                  "empty)")
        return clients
    return clients_by_column(_rows(root, bad), fields, str(root), bad)


def _jsonl_path(path: str) -> Path:
    if not path:
        raise ConfigError("task.data_dir: dataset \"jsonl\" needs a .jsonl file or a folder of "
                          "them (one per client), or task.source = \"hf:<dataset>\"")
    root = Path(path).expanduser()
    if not root.exists():
        raise DatasetNotFoundError(f"task.data_dir: {root}: no such file or folder")
    return root


def clients_by_column(
    rows: Sequence[tuple[str, Mapping[str, Any]]], fields: JsonlFields, origin: str,
    bad: BadLines | None = None,
) -> list[JsonlClient]:
    """Clients named by each row's `fields.client` column, in order of first appearance;
    `rows` are (where, row), `where` naming the file and line (or dataset and row). Bad rows
    go to `bad` (none given: they stop the reading, named together), settled here."""
    bad = BadLines() if bad is None else bad
    by_name: dict[str, JsonlClient] = {}
    for where, row in rows:
        name = row.get(fields.client)
        if not isinstance(name, str | int) or isinstance(name, bool) or name == "":
            bad.add(where, f"no {fields.client!r} (a string or integer naming the "
                    "client); one file holding every client needs it on each line "
                    "(task.client_field), or use a folder with one file per client, or split "
                    "the rows by a column (task.group_field)")
            continue
        client = by_name.get(str(name)) or JsonlClient(str(name), where, [])
        if bad.check(where, partial(_add_example, client, row, fields, where)) and (
                client.name not in by_name):
            by_name[client.name] = client
    bad.settle(origin)
    if not by_name:
        raise ConfigError(f"{origin}: no examples")
    return list(by_name.values())


def _add_example(client: JsonlClient, row: Mapping[str, Any], fields: JsonlFields,
                 where: str) -> bool:
    """Append the row's example to `client`, checking its cluster column first."""
    example = _example(row, fields, where)
    _set_cluster(client, row, fields, where)
    client.examples.append(example)
    return True


GroupSplit = Literal["dirichlet", "per-value"]
GROUP_SPLITS: tuple[str, ...] = choices(GroupSplit)
# Dirichlet draws that leave some client too few rows are redrawn this many times at most.
_GROUP_DRAWS = 100


def split_by_group(
    groups: Sequence[Any], num_clients: int, how: str, alpha: float, seed: int,
    min_rows: int = 2,
) -> tuple[list[np.ndarray], list[int], list[Any]]:
    """(row indices of each client, each client's cluster, the column's values in order).

    `dirichlet`: as label skew over classes (floral.data.partition), each value's rows are
    shared among the clients by proportions ~ Dir(alpha), redrawn until every client has
    `min_rows`; a client's cluster is the value most of its rows have. `per-value`: client k
    takes value k mod V (values sorted), whose rows its clients share evenly; its cluster is
    that value. Seeded by `seed`; every row goes to exactly one client."""
    values = sorted(set(groups), key=_value_order)
    index = {value: i for i, value in enumerate(values)}
    codes = np.array([index[g] for g in groups], dtype=np.int64)
    rng = np.random.default_rng([seed, 0xD1C7])
    if how == "per-value":
        if num_clients < len(values):
            raise ConfigError(f"task.num_clients: {num_clients} clients for {len(values)} "
                              "values with group_split = \"per-value\"; at least one client "
                              "per value")
        shares: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * num_clients
        for code in range(len(values)):
            members = clients_of_cluster(code, num_clients, len(values))
            rows = rng.permutation(np.flatnonzero(codes == code))
            for k, part in zip(members, np.array_split(rows, len(members)), strict=True):
                shares[k] = part
        clusters = [k % len(values) for k in range(num_clients)]
    else:
        for _ in range(_GROUP_DRAWS):
            proportions = dirichlet_proportions(len(values), num_clients, alpha, rng)
            shares = split_by_proportions(codes, proportions, rng)
            if min(len(s) for s in shares) >= min_rows:
                break
        else:
            raise ConfigError(
                f"task.dirichlet_alpha: {alpha} leaves some of {num_clients} clients fewer than "
                f"{min_rows} rows in {_GROUP_DRAWS} draws; raise it or use fewer clients"
            )
        clusters = [int(np.bincount(codes[s], minlength=len(values)).argmax()) for s in shares]
    short = next((k for k, s in enumerate(shares) if len(s) < min_rows), None)
    if short is not None:
        raise ConfigError(f"task.num_clients: client {short} gets {len(shares[short])} rows; "
                          f"each needs at least {min_rows} (use fewer clients)")
    return shares, clusters, values


def _value_order(value: Any) -> tuple[bool, Any]:
    return isinstance(value, str), value


def clients_by_group(
    rows: Sequence[tuple[str, Mapping[str, Any]]], fields: JsonlFields, group_field: str,
    cfg: Any, seed: int, origin: str, bad: BadLines | None = None,
) -> tuple[list[JsonlClient], list[Any]]:
    """`cfg.num_clients` clients from rows split by the `group_field` column
    (`split_by_group`), and the column's values (one cluster each). Bad rows go to `bad`
    (none given: `cfg.bad_lines` says what they do), settled here."""
    bad = BadLines(getattr(cfg, "bad_lines", "error")) if bad is None else bad
    examples, groups = [], []
    for where, row in rows:
        value = row.get(group_field)
        if not isinstance(value, str | int) or isinstance(value, bool) or value == "":
            bad.add(where, f"no {group_field!r} (task.group_field: a string or integer on "
                    "every line)")
            continue
        example = bad.check(where, partial(_example, row, fields, where))
        if example is not None:
            examples.append(example)
            groups.append(value)
    bad.settle(origin)
    if not examples:
        raise ConfigError(f"{origin}: no examples")
    shares, clusters, values = split_by_group(groups, cfg.num_clients, cfg.group_split,
                                              cfg.dirichlet_alpha, seed)
    clients = [
        JsonlClient(f"{group_field}-{k}", f"{origin} (client {k} of the rows split by "
                    f"{group_field!r})", [examples[i] for i in sorted(share)], values[cluster])
        for k, (share, cluster) in enumerate(zip(shares, clusters, strict=True))
    ]
    return clients, values


def _rows(file: Path, bad: BadLines) -> list[tuple[str, dict[str, Any]]]:
    """(where, row) of every JSON object line of `file`; the other lines go to `bad`."""
    rows = []
    text = read_utf8(file)
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{file}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            bad.add(where, f"not valid JSON ({error.msg})")
            continue
        if not isinstance(row, dict):
            bad.add(where, f"expected a JSON object, got {type(row).__name__}")
            continue
        rows.append((where, row))
    return rows


def _example(row: Mapping[str, Any], fields: JsonlFields, where: str) -> Example:
    if fields.messages in row:
        messages = row[fields.messages]
        if not isinstance(messages, list) or not messages:
            raise ConfigError(f"{where}: {fields.messages!r} must be a non-empty list of "
                              "{\"role\": ..., \"content\": ...}")
        turns = []
        for i, message in enumerate(messages):
            if (not isinstance(message, dict) or not isinstance(message.get("role"), str)
                    or not isinstance(message.get("content"), str)):
                raise ConfigError(f"{where}: {fields.messages}[{i}] must be "
                                  "{\"role\": <string>, \"content\": <string>}")
            turns.append((message["role"], message["content"]))
        if turns[-1][0] != "assistant" or len(turns) < 2:
            raise ConfigError(f"{where}: {fields.messages!r} must end with an \"assistant\" "
                              "message (the response to learn) after at least one other")
        return Example(tuple(turns))
    for key in (fields.prompt, fields.response):
        if key not in row:
            raise ConfigError(f"{where}: no {key!r} field (each line needs "
                              f"{fields.prompt!r} and {fields.response!r}, or "
                              f"{fields.messages!r})")
        if not isinstance(row[key], str):
            raise ConfigError(f"{where}: {key!r} must be a string, got "
                              f"{type(row[key]).__name__}")
    if not row[fields.response].strip():
        raise ConfigError(f"{where}: {fields.response!r} is empty")
    return Example.pair(row[fields.prompt], row[fields.response])


def _set_cluster(client: JsonlClient, row: Mapping[str, Any], fields: JsonlFields,
                 where: str) -> None:
    """The client's cluster from a row about to join its examples (the first sets it)."""
    has = fields.cluster in row
    value = row.get(fields.cluster)
    if has and (not isinstance(value, str | int) or isinstance(value, bool)):
        raise ConfigError(f"{where}: {fields.cluster!r} must be a string or integer")
    if not client.examples:
        client.cluster = value if has else None
    elif value != client.cluster:
        raise ConfigError(
            f"{where}: client {client.name!r}'s {fields.cluster!r} is {value!r} here "
            f"but {client.cluster!r} before: a client belongs to one cluster"
        )


# -- building the clients ---------------------------------------------------------------------


@dataclass
class PromptedClient:
    """One client's tensors (floral.data.task wraps them in a ClientData)."""

    cluster: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    generation: GenerationData


@dataclass
class PromptedTask:
    clients: list[PromptedClient]
    num_clusters: int
    generation: TextGeneration
    skipped_lines: int = 0  # bad lines left out (task.bad_lines = "skip")


def _client(
    tokenizer: Tokenizer, template: str, train: Sequence[Example], test: Sequence[Example],
    cluster: int, max_length: int, drop_long: bool, who: str,
    sources: Sequence[str] | None = None,
) -> PromptedClient:
    """A client's tensors; `sources` (one per test example) stand for what each test prompt
    asks, where that is not the prompt's text itself."""
    x_train, y_train, _, _ = encode_examples(tokenizer, template, train, max_length, drop_long)
    x_test, y_test, prompts, kept = encode_examples(tokenizer, template, test, max_length,
                                                    drop_long)
    for split, count in (("training", len(x_train)), ("test", len(x_test))):
        if count == 0:
            raise ConfigError(
                f"task.max_length: {who} has no {split} example of at most {max_length} "
                "tokens (prompt and response); raise task.max_length"
            )
    references = [test[i].response for i in kept]
    sources = [test[i].source if sources is None else sources[i] for i in kept]
    return PromptedClient(cluster, x_train, y_train, x_test, y_test,
                          GenerationData(prompts, references, sources))


def build_translations(cfg: Any, seed: int, tokenizer: Tokenizer) -> PromptedTask:
    """Client k translates into language k mod C (its cluster); `cfg` is a TaskConfig."""
    template = resolve_template(cfg.template, tokenizer)
    pool, tables = translation_pool(cfg.data_dir, cfg.catalogs, cfg.languages)
    if len(pool) < 2 * cfg.num_clients:
        raise ConfigError(
            f"task.num_clients: {cfg.num_clients} clients need at least {2 * cfg.num_clients} "
            f"strings translated in every language; {', '.join(cfg.catalogs)} has {len(pool)} "
            f"in {', '.join(cfg.languages)}"
        )
    train_pool, test_pool = split_pool(pool, cfg.test_fraction, seed)
    train_shares = cluster_shares(train_pool, cfg.num_clients, cfg.num_clusters)
    test_shares = cluster_shares(test_pool, cfg.num_clients, cfg.num_clusters)
    clients = []
    for k in range(cfg.num_clients):
        cluster = k % cfg.num_clusters
        language = tables[cfg.languages[cluster]]
        train = train_shares[k]
        if cfg.samples_per_client:
            train = train[: cfg.samples_per_client]
        train = train[: max(math.floor(cfg.data_fraction * len(train) + 0.5), cfg.min_samples)]

        def example(source: str, language: dict[str, str] = language) -> Example:
            return with_system(Example.pair(cfg.prompt_template.format(text=source),
                                            language[source]), cfg.system)

        clients.append(_client(
            tokenizer, template, [example(s) for s in train], [example(s) for s in test_shares[k]],
            cluster, cfg.max_length, True, f"client {k} ({cfg.languages[cluster]})",
            sources=test_shares[k],
        ))
    generation = TextGeneration(tokenizer, cfg.generate_tokens, template, cfg.system,
                                cfg.prompt_template)
    return PromptedTask(clients, cfg.num_clusters, generation)


def build_jsonl(
    cfg: Any, seed: int, tokenizer: Tokenizer, client_ids: Sequence[int] | None = None
) -> PromptedTask:
    """Clients of users' JSON-lines files; `cfg` is a TaskConfig. `client_ids` are the clients'
    indices in the federation, which seed their train/held-out splits (default: their order
    here); a Flower node that holds one client's file passes that client's index, so its
    split is the one the local engine draws over the whole folder."""
    template = resolve_template(cfg.template, tokenizer)
    fields = JsonlFields(cfg.prompt_field, cfg.response_field, cfg.messages_field,
                         cfg.client_field, cfg.cluster_field)
    bad = BadLines(cfg.bad_lines)
    found, values, origin = _found_clients(cfg, fields, seed, bad)
    if len(found) != cfg.num_clients:
        raise ConfigError(f"task.num_clients: {origin} holds {len(found)} clients; set "
                          f"task.num_clients = {len(found)}")
    if values is None:
        with_cluster = [c for c in found if c.cluster is not None]
        if with_cluster and len(with_cluster) != len(found):
            missing = next(c for c in found if c.cluster is None)
            raise ConfigError(f"{missing.where}: client {missing.name!r} has no "
                              f"{fields.cluster!r} while other clients have one")
        values = sorted({c.cluster for c in with_cluster}, key=_value_order)
        column = fields.cluster
    else:
        column = cfg.group_field
    if len(values or [None]) != cfg.num_clusters:
        raise ConfigError(
            f"task.num_clusters: {origin} holds {len(values or [None])} cluster(s) "
            f"(column {column!r}{'' if values else ' absent: one cluster'}); set "
            f"task.num_clusters = {len(values or [None])}"
        )
    index = {value: i for i, value in enumerate(values)}
    ids = list(range(len(found))) if client_ids is None else list(client_ids)
    if len(ids) != len(found):
        raise ValueError(f"{len(ids)} client ids for {len(found)} clients")
    clients = []
    for k, client in zip(ids, found, strict=True):
        n = len(client.examples)
        if n < 2:
            raise ConfigError(f"{client.where}: client {client.name!r} has {n} example; it needs "
                              "at least 2 (one to train, one to test)")
        order = np.random.default_rng([seed, k, 0x75E2]).permutation(n)
        num_test = min(max(1, math.floor(cfg.test_fraction * n + 0.5)), n - 1)
        test = [client.examples[i] for i in order[:num_test]]
        train = [client.examples[i] for i in order[num_test:]]
        if cfg.samples_per_client:
            train = train[: cfg.samples_per_client]
        train = train[: max(math.floor(cfg.data_fraction * len(train) + 0.5), cfg.min_samples)]
        cluster = index.get(client.cluster, 0)
        test = [with_system(e, cfg.system) for e in test]
        train = [with_system(e, cfg.system) for e in train]
        clients.append(_client(tokenizer, template, train, test, cluster, cfg.max_length, False,
                               f"client {client.name!r} ({client.where})"))
    return PromptedTask(clients, cfg.num_clusters,
                        TextGeneration(tokenizer, cfg.generate_tokens, template, cfg.system),
                        skipped_lines=bad.count)


def _found_clients(
    cfg: Any, fields: JsonlFields, seed: int, bad: BadLines
) -> tuple[list[JsonlClient], list[Any] | None, str]:
    """(clients, the group column's values if the rows are split by one, where they came
    from): from task.source (a Hugging Face dataset) or task.data_dir; bad rows go to
    `bad`, settled (reported, or left out) before any client is built."""
    if cfg.source:
        from floral.llm.hf_data import load_rows  # needs the datasets package

        rows, origin = load_rows(cfg.source.removeprefix(HF_PREFIX), cfg.split)
    else:
        root = _jsonl_path(cfg.data_dir)
        origin = str(root)
        if root.is_dir():
            if cfg.group_field:
                raise ConfigError(f"task.group_field: splits the rows of one file (or "
                                  f"task.source); {root} is a folder of one file per client")
            return read_jsonl(cfg.data_dir, fields, bad), None, origin
        rows = _rows(root, bad)
    if cfg.group_field:
        clients, values = clients_by_group(rows, fields, cfg.group_field, cfg, seed, origin,
                                           bad)
        return clients, values, origin
    return clients_by_column(rows, fields, origin, bad), None, origin
