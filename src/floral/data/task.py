"""Federated tasks: each client's train and test tensors, built from a `[task]` table and a seed.

Each dataset is registered (floral.data.registry) with the options it reads and its builder;
the families below are synthetic regression, image sources, the Austen novels, users' text
folders, and prompt/response tasks (translations, JSON lines).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from floral.config import KeyScope, Range, check_choice, check_ranges, field_default
from floral.data.instruct import (
    HF_PREFIX,
    BadLinesPolicy,
    GenerationData,
    GroupSplit,
    PromptedTask,
    Template,
    TextGeneration,
    build_jsonl,
    build_translations,
)
from floral.data.own_text import OWN_TEXT_DATASETS, build_text_clients
from floral.data.partition import (
    LABEL_SKEWS,
    class_sets,
    clients_of_cluster,
    cluster_of,
    dirichlet_proportions,
    keep_fraction,
    partition,
    set_proportions,
    split_by_proportions,
)
from floral.data.registry import dataset_entry, dataset_names, register_dataset
from floral.data.shifts import Shift, rotate, rotation_angle, shift_labels
from floral.data.sources import IMAGE_SOURCES, SPLIT_SOURCES, ImageData, load_source
from floral.data.synthetic import INPUT_DIM, SYNTHETIC_DATASETS, generate_clients
from floral.data.text import (
    AUSTEN_NOVELS,
    TEXT_DATASETS,
    austen_novels,
    client_blocks,
    cluster_parts,
    load_tokenizer,
    trim_train,
)
from floral.errors import ConfigError

__all__ = [
    "DATASETS", "TaskConfig", "ClientData", "FederatedTask", "build_task", "cluster_images",
    "outline_task", "task_outline", "validate_task",
]

# Known before loading, so that a bad label-set setting fails before any file is read.
_NUM_CLASSES = {name: 10 for name in IMAGE_SOURCES} | {"cifar100": 100}


@dataclass
class TaskConfig:
    """The `[task]` table of an experiment."""

    dataset: str = "mnist5k"  # a registered dataset (floral.data.registry)
    shift: Shift = "label-shift"
    num_clients: int = 300
    num_clusters: int = 4
    data_fraction: float = 1.0  # keep this fraction of each client's training data ...
    min_samples: int = 10  # ... but at least this many
    test_fraction: float = 0.2  # for sources with no test split (mnist5k, digits) and synthetic
    # synthetic: samples (0 = the paper's value); austen: blocks, train + test (0 = all)
    samples_per_client: int = 0
    data_dir: str = ""  # folder of IDX / CIFAR binary files; "" = the source's default
    # shift = "dirichlet": class shares per client ~ Dir(alpha); jsonl with group_field: the same
    # over the group column's values.
    dirichlet_alpha: float = 0.5
    classes_per_client: int = 2  # shift = "classes-per-client": distinct classes each client holds
    block_size: int = 64  # austen: tokens per example (a causal-LM block)
    tokenizer: str = "smollm2"  # text: smollm2 | hf:<folder or .gguf> | bytes (UTF-8 bytes)
    # translations, jsonl (floral.data.instruct): prompt + response tokens, padded to this; how
    # an example becomes text (auto = the tokenizer's chat template if it has one | chat |
    # plain); new tokens generated per held-out prompt in evaluation (0 = perplexity only).
    max_length: int = 64
    template: Template = "auto"
    generate_tokens: int = 32
    # translations: one target language per cluster, from these gettext catalogs (data_dir =
    # the locale folder, "" = /usr/share/locale); the prompt, which never names the language.
    languages: list[str] = field(default_factory=lambda: ["de", "fr", "es", "it"])
    catalogs: list[str] = field(default_factory=lambda: ["iso_3166-1"])
    prompt_template: str = "Translate: {text}"
    # translations, jsonl with template = chat: a system message before every prompt ("" = none:
    # the chat template's own default, if it has one).
    system: str = ""
    # jsonl: the fields of a line (data_dir = a .jsonl file, or a folder of one per client).
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    client_field: str = "client"
    cluster_field: str = "cluster"
    # jsonl: rows from a Hugging Face dataset instead of data_dir: "hf:<name, save_to_disk
    # folder or data file>" (floral.llm.hf_data), and which split.
    source: str = ""
    split: str = "train"
    # jsonl (one file, or source): split the rows into num_clients clients by this column's
    # values instead of a client column: dirichlet (each value's rows shared ~ Dir(dirichlet_
    # alpha); a client's cluster is its most common value) | per-value (client k takes value
    # k mod V, its cluster).
    group_field: str = ""
    group_split: GroupSplit = "dirichlet"
    # jsonl: a line that is not a usable example stops the run, naming every such line (the
    # first 10 and the count): error | skip (leave them out, with a warning; the run's summary
    # counts them).
    bad_lines: BadLinesPolicy = "error"
    # text (floral.data.own_text): each client's cluster, {client name = label}, or the part of
    # its name before this separator; neither = one cluster.
    clusters: dict[str, str] = field(default_factory=dict)
    cluster_separator: str = ""

    RANGES: ClassVar[dict[str, Range]] = {
        "num_clients": Range("[1, inf)"),
        "num_clusters": Range("[1, inf)"),  # and at most num_clients (validate_task)
        "data_fraction": Range("(0, 1]"),
        "min_samples": Range("[0, inf)"),
        "test_fraction": Range("(0, 1]"),
        "samples_per_client": Range("[0, inf)", zero="the dataset's default"),
        "dirichlet_alpha": Range("(0, inf)"),
        "classes_per_client": Range("[1, inf)"),  # and at most the dataset's classes
        "block_size": Range("[1, inf)"),
        "max_length": Range("[2, inf)"),
        "generate_tokens": Range("[0, inf)", zero="perplexity only"),
    }

    @classmethod
    def key_scope(cls, data: Mapping[str, Any], prefix: str) -> KeyScope | None:
        """The keys that the table's dataset reads: floral.config.from_dict refuses the others."""
        name = data.get("dataset", cls.dataset)
        if not isinstance(name, str):
            return None  # the type check names it
        return dataset_entry(name, f"{prefix}.dataset" if prefix else "dataset").scope


@dataclass
class ClientData:
    client_id: int
    cluster: int
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    # Prompt/response tasks: held-out prompts and references, for evaluation by generation.
    generation: GenerationData | None = None

    @property
    def num_train(self) -> int:
        return len(self.y_train)


@dataclass
class FederatedTask:
    name: str
    kind: str  # "classification" | "regression" | "causal-lm"
    input_shape: tuple[int, ...]  # per sample, e.g. (1, 28, 28) or (10,)
    num_outputs: int  # classes, regression output dimension, or vocabulary size
    num_clusters: int
    clients: list[ClientData]
    # Generating parameters of synthetic tasks (W, b, u, v, W_out); empty for real data.
    extras: dict[str, Tensor] = field(default_factory=dict)
    # Prompt/response tasks: how clients generate text in evaluation (None: they do not).
    generation: TextGeneration | None = None
    skipped_lines: int = 0  # bad lines of the data left out (task.bad_lines = "skip")


def task_outline(task: FederatedTask, tokenizer: str = "") -> dict[str, Any]:
    """What a finished run needs of its task to rebuild its clients' models and have them
    answer new prompts, without the data: the shapes, each client's cluster and, where the
    clients generate text, how a prompt is rendered and answered (`tokenizer`: the task's
    `task.tokenizer`, a path in it absolute). JSON-ready; `outline_task` reads it back."""
    outline: dict[str, Any] = {
        "name": task.name,
        "kind": task.kind,
        "input_shape": list(task.input_shape),
        "num_outputs": task.num_outputs,
        "num_clusters": task.num_clusters,
        "clusters": [client.cluster for client in task.clients],
        "generation": None,
    }
    if task.generation is not None:
        generation = task.generation
        outline["generation"] = {
            "tokenizer": tokenizer,
            "template": generation.template,  # resolved: chat | plain
            "system": generation.system,
            "prompt_template": generation.prompt_template,
            "max_new_tokens": generation.max_new_tokens,
        }
    return outline


def outline_task(outline: Mapping[str, Any]) -> FederatedTask:
    """The task of a `task_outline`: its clients hold no examples, and its generation (if
    any) loads the recorded tokenizer."""
    shape = tuple(int(n) for n in outline["input_shape"])
    kind = outline["kind"]
    x_type = torch.long if kind == "causal-lm" else torch.float32
    y_shape = (0, *shape) if kind == "causal-lm" else (0,)
    if kind == "regression":
        y_shape = (0, int(outline["num_outputs"]))
    y_type = torch.float32 if kind == "regression" else torch.long
    clients = [
        ClientData(k, int(cluster), torch.empty((0, *shape), dtype=x_type),
                   torch.empty(y_shape, dtype=y_type), torch.empty((0, *shape), dtype=x_type),
                   torch.empty(y_shape, dtype=y_type))
        for k, cluster in enumerate(outline["clusters"])
    ]
    generation = None
    if outline.get("generation"):
        settings = outline["generation"]
        generation = TextGeneration(
            load_tokenizer(settings["tokenizer"]), int(settings["max_new_tokens"]),
            settings["template"], settings["system"], settings["prompt_template"],
        )
    return FederatedTask(
        name=outline["name"], kind=kind, input_shape=shape,
        num_outputs=int(outline["num_outputs"]), num_clusters=int(outline["num_clusters"]),
        clients=clients, generation=generation,
    )


def build_task(cfg: TaskConfig, seed: int) -> FederatedTask:
    """Every client's data for `cfg`; the same seed gives the same task."""
    validate_task(cfg)
    return dataset_entry(cfg.dataset).build(cfg, seed)


def validate_task(cfg: TaskConfig) -> None:
    """The checks build_task runs before building: one-line errors naming the key."""
    entry = dataset_entry(cfg.dataset)
    _check_options(cfg, entry.scope)
    check_choice("task.shift", cfg.shift, Shift)
    check_ranges(cfg, "task")
    _check(
        cfg.num_clusters <= cfg.num_clients,
        "task.num_clusters",
        f"{cfg.num_clusters} clusters need at least as many clients (task.num_clients ="
        f" {cfg.num_clients})",
    )
    entry.check(cfg)


def _check_options(cfg: TaskConfig, scope: KeyScope) -> None:
    """A setting the dataset does not read would be silently ignored: only its default may
    stand (the same rule as the `[task]` reader's, for a TaskConfig built in code)."""
    for f in dataclasses.fields(cfg):
        if f.name not in scope.keys and getattr(cfg, f.name) != field_default(f):
            raise scope.refuse(f"task.{f.name}")


def _check_synthetic(cfg: TaskConfig) -> None:
    _check(
        cfg.shift == "none",
        "task.shift",
        f"'{cfg.shift}' needs labelled images; {cfg.dataset} is a regression task whose"
        " clusters differ by construction (use 'none')",
    )


def _check_images(cfg: TaskConfig) -> None:
    if cfg.shift in LABEL_SKEWS:
        _check_label_skew(cfg)
    elif cfg.shift == "label-set":
        num_classes = _NUM_CLASSES[cfg.dataset]
        _check(
            cfg.num_clusters <= num_classes,
            "task.num_clusters",
            f"label-set needs at most one cluster per class ({num_classes} in {cfg.dataset}),"
            f" got {cfg.num_clusters}",
        )


def _check_austen(cfg: TaskConfig) -> None:
    _check(
        cfg.shift == "none",
        "task.shift",
        f"'{cfg.shift}' needs labelled images; in {cfg.dataset} cluster c reads novel c, a"
        " shift by construction (use 'none')",
    )
    _check(
        cfg.num_clusters <= len(AUSTEN_NOVELS),
        "task.num_clusters",
        f"austen has {len(AUSTEN_NOVELS)} novels, one per cluster; got {cfg.num_clusters}",
    )
    _check(
        cfg.samples_per_client != 1,
        "task.samples_per_client",
        "a client needs at least 2 blocks (one to train, one to test)",
    )


def _check_own_text(cfg: TaskConfig) -> None:
    _check(cfg.shift == "none", "task.shift",
           f"'{cfg.shift}' needs labelled images; text clients' clusters come from "
           "task.clusters or task.cluster_separator (use 'none')")
    _check(cfg.samples_per_client != 1, "task.samples_per_client",
           "a client needs at least 2 blocks (one to train, one to test)")


def _check_prompted(cfg: TaskConfig) -> None:
    _check(cfg.shift == "none", "task.shift",
           f"'{cfg.shift}' needs labelled images; {cfg.dataset}'s clusters come from the data "
           "(use 'none')")
    check_choice("task.template", cfg.template, Template)


def _check_translations(cfg: TaskConfig) -> None:
    _check_prompted(cfg)
    _check(len(cfg.languages) == cfg.num_clusters, "task.languages",
           f"one language per cluster: {len(cfg.languages)} for task.num_clusters = "
           f"{cfg.num_clusters}")
    _check(len(set(cfg.languages)) == len(cfg.languages), "task.languages",
           f"a language twice in {cfg.languages}")
    _check(bool(cfg.catalogs), "task.catalogs", "name at least one, e.g. [\"iso_3166-1\"]")
    try:
        cfg.prompt_template.format(text="")
    except (KeyError, IndexError, ValueError) as error:
        raise ConfigError(f"task.prompt_template: {cfg.prompt_template!r} must hold {{text}} "
                          f"and no other field ({error!r})") from None
    _check("{text}" in cfg.prompt_template, "task.prompt_template",
           f"{cfg.prompt_template!r} must hold {{text}}, where the English string goes")


def _check_jsonl(cfg: TaskConfig) -> None:
    """The keys that say where rows come from and how they make clients."""
    _check_prompted(cfg)
    if cfg.source:
        _check(cfg.source.startswith(HF_PREFIX) and len(cfg.source) > len(HF_PREFIX),
               "task.source", f"{cfg.source!r}: expected \"hf:<dataset name, folder or file>\"")
        _check(not cfg.data_dir, "task.source",
               f"set it or task.data_dir ({cfg.data_dir!r}), not both")
        _check(bool(cfg.split), "task.split", "name the split to read, e.g. \"train\"")
    check_choice("task.bad_lines", cfg.bad_lines, BadLinesPolicy)
    if cfg.group_field:
        check_choice("task.group_split", cfg.group_split, GroupSplit)


def _check_label_skew(cfg: TaskConfig) -> None:
    num_classes = _NUM_CLASSES[cfg.dataset]
    per_client = cfg.classes_per_client
    _check(
        1 <= per_client <= num_classes,
        "task.classes_per_client",
        f"must be between 1 and {num_classes} ({cfg.dataset} has {num_classes} classes),"
        f" got {per_client}",
    )


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _build_image_task(cfg: TaskConfig, seed: int) -> FederatedTask:
    source = _image_source(cfg)
    rng = np.random.default_rng(seed)
    num_clients, num_clusters = cfg.num_clients, cfg.num_clusters
    full_shares, test_shares = _shares(cfg, source, rng)
    train_shares = [keep_fraction(s, cfg.data_fraction, cfg.min_samples) for s in full_shares]
    _check_training_data(cfg, [len(s) for s in full_shares], [len(s) for s in train_shares])

    clients: list[ClientData | None] = [None] * num_clients
    for cluster in range(num_clusters):
        members = clients_of_cluster(cluster, num_clients, num_clusters)
        train = _cluster_tensors(source, "train", [train_shares[k] for k in members], cfg, cluster)
        test = _cluster_tensors(source, "test", [test_shares[k] for k in members], cfg, cluster)
        for k, (x_train, y_train), (x_test, y_test) in zip(members, train, test, strict=True):
            clients[k] = ClientData(k, cluster, x_train, y_train, x_test, y_test)
    return FederatedTask(
        name=cfg.dataset,
        kind="classification",
        input_shape=source.image_shape,
        num_outputs=source.num_classes,
        num_clusters=num_clusters,
        clients=clients,  # type: ignore[arg-type]  # every slot is filled above
    )


def _image_source(cfg: TaskConfig) -> ImageData:
    """The source's images; test_fraction only for a source that has no test split."""
    name = cfg.dataset
    test_fraction = cfg.test_fraction if name in SPLIT_SOURCES else 0.0
    return load_source(name, cfg.data_dir, test_fraction)


def _shares(
    cfg: TaskConfig, source: ImageData, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each client's train and test indices; label skews give both splits the same proportions."""
    if cfg.shift not in LABEL_SKEWS:
        by_label_set = cfg.shift == "label-set"
        args = (cfg.num_clients, cfg.num_clusters, rng, by_label_set)
        return partition(source.y_train, *args), partition(source.y_test, *args)
    if cfg.shift == "classes-per-client":
        sets = class_sets(source.num_classes, cfg.num_clients, cfg.classes_per_client, rng)
        proportions = set_proportions(sets, source.num_classes)
    else:
        proportions = _dirichlet_with_data(cfg, source, rng)
    train = split_by_proportions(source.y_train, proportions, rng)
    return train, split_by_proportions(source.y_test, proportions, rng)


# Dirichlet draws that leave some client too few samples are redrawn this many times at most.
_DIRICHLET_DRAWS = 100


def _dirichlet_with_data(
    cfg: TaskConfig, source: ImageData, rng: np.random.Generator
) -> np.ndarray:
    """Dirichlet proportions under which every client gets at least max(1, min_samples) training
    samples (the usual redraw; small alpha with many clients may need a few)."""
    counts = np.bincount(source.y_train, minlength=source.num_classes)
    needed = max(1, cfg.min_samples)
    for _ in range(_DIRICHLET_DRAWS):
        proportions = dirichlet_proportions(
            source.num_classes, cfg.num_clients, cfg.dirichlet_alpha, rng
        )
        # Rounding down per class loses less than one sample per class: a safe lower bound.
        if (counts @ proportions - source.num_classes >= needed).all():
            return proportions
    raise ConfigError(
        f"task.dirichlet_alpha: {cfg.dirichlet_alpha} leaves some of {cfg.num_clients} clients"
        f" fewer than {needed} training samples in {_DIRICHLET_DRAWS} draws; raise it or use"
        " fewer clients"
    )


def _cluster_tensors(
    source: ImageData, split: str, shares: list[np.ndarray], cfg: TaskConfig, cluster: int
) -> list[tuple[Tensor, Tensor]]:
    """The shifted, normalized (x, y) of each client of one cluster, built in one batch."""
    pixels, labels = getattr(source, f"x_{split}"), getattr(source, f"y_{split}")
    index = np.concatenate(shares)
    x, y = cluster_images(pixels[index], labels[index], source, cfg, cluster)
    sizes = [len(s) for s in shares]
    return [
        (_own_copy(xs), _own_copy(ys))
        for xs, ys in zip(x.split(sizes), y.split(sizes), strict=True)
    ]


def cluster_images(
    pixels: np.ndarray, labels: np.ndarray, source: ImageData, cfg: TaskConfig, cluster: int
) -> tuple[Tensor, Tensor]:
    """Images scaled to [0, 1], shifted as the cluster's (rotation or labels) and normalized
    by the dataset's mean and std; the arrays become the tensors' storage."""
    x = torch.from_numpy(pixels).float().div_(source.max_value)
    y = torch.from_numpy(labels)
    if cfg.shift == "rotate":
        x = rotate(x, rotation_angle(cluster, cfg.num_clusters))
    elif cfg.shift == "label-shift":
        y = shift_labels(y, cluster, source.num_classes)
    mean = torch.tensor(source.mean).view(1, -1, 1, 1)
    std = torch.tensor(source.std).view(1, -1, 1, 1)
    return x.sub_(mean).div_(std).contiguous(), y


def _own_copy(part: Tensor) -> Tensor:
    """A copy with its own storage: a view would drag the whole cluster along when serialized.

    Copied by numpy because `Tensor.clone` starts its thread pool on every call, which costs
    more than the copy itself for hundreds of client-sized tensors.
    """
    return torch.from_numpy(part.numpy().copy())


def _check_training_data(cfg: TaskConfig, shared: list[int], kept: list[int]) -> None:
    for client_id, (before, after) in enumerate(zip(shared, kept, strict=True)):
        if before == 0:
            raise ConfigError(
                f"task.num_clients: client {client_id} gets no training samples"
                f" ({sum(shared)} in total for {cfg.num_clients} clients"
                f"{' with label-set' if cfg.shift == 'label-set' else ''}); use fewer clients"
            )
        if after == 0:
            raise ConfigError(
                f"task.data_fraction: {cfg.data_fraction} leaves client {client_id} no training"
                f" samples (it has {before}); raise it or task.min_samples"
            )


def _build_austen(cfg: TaskConfig, seed: int) -> FederatedTask:
    """Causal-LM clients: token blocks of novel `cluster` (floral.data.text), cut in order:
    no draw, so `seed` plays no part."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    parts = cluster_parts(austen_novels(cfg.data_dir), cfg.num_clients, cfg.num_clusters)
    clients = []
    for client_id, (cluster, paragraphs) in enumerate(parts):
        train, test = client_blocks(
            paragraphs, tokenizer, cfg.block_size, cfg.samples_per_client, cfg.test_fraction
        )
        _check(
            len(test) > 0,
            "task.num_clients",
            f"client {client_id}'s share of {AUSTEN_NOVELS[cluster]} makes fewer than 2 blocks"
            f" of {cfg.block_size} tokens; use fewer clients or shorter blocks",
        )
        train = trim_train(train, cfg.data_fraction, cfg.min_samples)
        clients.append(_block_client(client_id, cluster, train, test))
    return _block_task(cfg, tokenizer.vocab_size, clients)


def _build_own_text(cfg: TaskConfig, seed: int) -> FederatedTask:
    """Causal-LM clients of users' plain-text files (floral.data.own_text), cut in order."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    clients = [
        _block_client(k, c.cluster, c.train, c.test)
        for k, c in enumerate(build_text_clients(cfg, tokenizer))
    ]
    return _block_task(cfg, tokenizer.vocab_size, clients)


def _block_client(client_id: int, cluster: int, train: Tensor, test: Tensor) -> ClientData:
    # Input: a block's first block_size tokens; target: its last block_size.
    return ClientData(client_id, cluster, train[:, :-1].clone(), train[:, 1:].clone(),
                      test[:, :-1].clone(), test[:, 1:].clone())


def _block_task(cfg: TaskConfig, vocab_size: int, clients: list[ClientData]) -> FederatedTask:
    return FederatedTask(
        name=cfg.dataset,
        kind="causal-lm",
        input_shape=(cfg.block_size,),
        num_outputs=vocab_size,
        num_clusters=cfg.num_clusters,
        clients=clients,
    )


def _build_translations(cfg: TaskConfig, seed: int) -> FederatedTask:
    """Prompt/response clients, each translating into its cluster's language."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    return _prompted_task(cfg, tokenizer.vocab_size, build_translations(cfg, seed, tokenizer))


def _build_jsonl(cfg: TaskConfig, seed: int) -> FederatedTask:
    """Prompt/response clients of users' JSON lines, or of a Hugging Face dataset's rows."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    return _prompted_task(cfg, tokenizer.vocab_size, build_jsonl(cfg, seed, tokenizer))


def _prompted_task(cfg: TaskConfig, vocab_size: int, built: PromptedTask) -> FederatedTask:
    clients = [
        ClientData(k, c.cluster, c.x_train, c.y_train, c.x_test, c.y_test, c.generation)
        for k, c in enumerate(built.clients)
    ]
    return FederatedTask(
        name=cfg.dataset,
        kind="causal-lm",
        input_shape=(cfg.max_length,),
        num_outputs=vocab_size,
        num_clusters=built.num_clusters,
        clients=clients,
        generation=built.generation if cfg.generate_tokens > 0 else None,
        skipped_lines=built.skipped_lines,
    )


def _build_synthetic(cfg: TaskConfig, seed: int) -> FederatedTask:
    params, data = generate_clients(
        cfg.dataset, cfg.num_clients, cfg.num_clusters, cfg.samples_per_client, seed
    )
    num_samples = len(data[0][0])
    num_test = math.floor(num_samples * cfg.test_fraction + 0.5)
    _check(
        num_test < num_samples,
        "task.test_fraction",
        f"{cfg.test_fraction} leaves no training samples of {num_samples} per client",
    )
    train_pool = np.arange(num_samples - num_test)
    num_train = len(keep_fraction(train_pool, cfg.data_fraction, cfg.min_samples))
    _check(
        num_train > 0,
        "task.data_fraction",
        f"{cfg.data_fraction} leaves no training samples; raise it or task.min_samples",
    )
    clients = []
    for client_id, (x, y) in enumerate(data):
        clients.append(
            ClientData(
                client_id=client_id,
                cluster=cluster_of(client_id, cfg.num_clusters),
                x_train=x[:num_train].clone(),
                y_train=y[:num_train].clone(),
                x_test=x[num_samples - num_test :].clone(),
                y_test=y[num_samples - num_test :].clone(),
            )
        )
    return FederatedTask(
        name=cfg.dataset,
        kind="regression",
        input_shape=(INPUT_DIM,),
        num_outputs=SYNTHETIC_DATASETS[cfg.dataset].num_outputs,
        num_clusters=cfg.num_clusters,
        clients=clients,
        extras=params,
    )


# -- the registered datasets: what each reads beyond the common options -----------------------

# Dirichlet and classes-per-client shares are options of every image source (task.shift picks
# one). So is data_dir, digits included: its loader reads no folder, but a config switched to
# digits from another source still carries one.
_IMAGE_OPTIONS = ("data_dir", "dirichlet_alpha", "classes_per_client")
_SYNTHETIC_OPTIONS = ("samples_per_client", "test_fraction")
# Token blocks of text, as floral.data.text cuts them.
_BLOCK_OPTIONS = ("data_dir", "tokenizer", "block_size", "samples_per_client", "test_fraction")
_PROMPTED_OPTIONS = (
    "data_dir", "tokenizer", "max_length", "template", "generate_tokens", "system",
    "samples_per_client", "test_fraction",
)


def _image_options(name: str) -> tuple[str, ...]:
    split = ("test_fraction",) if name in SPLIT_SOURCES else ()
    return (*_IMAGE_OPTIONS, *split)


def _register_datasets() -> None:
    for name in SYNTHETIC_DATASETS:
        register_dataset(name, _SYNTHETIC_OPTIONS, _check_synthetic, _build_synthetic)
    for name in IMAGE_SOURCES:
        register_dataset(name, _image_options(name), _check_images, _build_image_task)
    for name in TEXT_DATASETS:
        register_dataset(name, _BLOCK_OPTIONS, _check_austen, _build_austen)
    for name in OWN_TEXT_DATASETS:
        register_dataset(
            name, (*_BLOCK_OPTIONS, "clusters", "cluster_separator"), _check_own_text,
            _build_own_text,
        )
    register_dataset(
        "translations", (*_PROMPTED_OPTIONS, "languages", "catalogs", "prompt_template"),
        _check_translations, _build_translations,
    )
    register_dataset(
        "jsonl",
        (
            *_PROMPTED_OPTIONS, "prompt_field", "response_field", "messages_field",
            "client_field", "cluster_field", "source", "split", "group_field", "group_split",
            "dirichlet_alpha", "bad_lines",
        ),
        _check_jsonl, _build_jsonl,
    )


_register_datasets()
DATASETS: tuple[str, ...] = dataset_names()
