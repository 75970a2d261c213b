"""Model choice from the `[model]` table and the task it must fit."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from floral.config import Range
from floral.data import FederatedTask
from floral.errors import ConfigError
from floral.models.hetero import HETERO_WIDTHS, HeteroCNN, HeteroFamily
from floral.models.networks import MLP, VGG8, LinearModel, PaperCNN
from floral.models.quantize import Quantize
from floral.train.device import Dtype
from floral.train.state import aligned

__all__ = [
    "MODEL_NAMES",
    "ModelConfig",
    "build_model",
    "enable_gradient_checkpointing",
    "load_pretrained",
    "resolve_name",
]

# hetero-cnn: the family of five CNNs, one per client (floral.models.hetero); hetero-cnn-<i>:
# architecture i alone, the same for every client.
HETERO_NAMES: tuple[str, ...] = (
    "hetero-cnn", *(f"hetero-cnn-{i}" for i in range(len(HETERO_WIDTHS)))
)
MODEL_NAMES: tuple[str, ...] = ("auto", "linear", "mlp", "cnn", "vgg8", *HETERO_NAMES)

# The paper's model for each dataset, picked by name = "auto".
_AUTO = {
    "synthetic-linear": ("linear", []),
    "synthetic-mlp": ("mlp", [20]),
    "mnist": ("mlp", [200]),
    "fashion-mnist": ("mlp", [200]),
    "mnist5k": ("mlp", [200]),
    "digits": ("mlp", [200]),
    "cifar10": ("cnn", []),
    "cifar100": ("vgg8", []),
    "austen": ("hf:smollm2", []),
    "translations": ("hf:smollm2", []),
    "jsonl": ("hf:smollm2", []),
    "text": ("hf:smollm2", []),
}


@dataclass
class ModelConfig:
    """The `[model]` table. `hidden` applies to name = "mlp"; "auto" takes the paper's model."""

    # auto | linear | mlp | cnn | vgg8 | hetero-cnn | hetero-cnn-<0..4>; causal LMs:
    # hf:smollm2 | hf:<folder or .gguf> | tiny-llama | tiny-gpt2 (floral.llm)
    name: str = "auto"
    hidden: list[int] = field(default_factory=lambda: [200])
    # A safetensors file of pretrained weights: a run's state.safetensors (its "global/"
    # tensors) or plain tensors named as in the model's state_dict. "" = fresh init.
    init_from: str = ""
    # The frozen tensors' storage and the forward's compute: float32 | bfloat16 | float16
    # (mixed precision: trained tensors and their optimizer state stay float32).
    dtype: Dtype = "float32"
    # A frozen base's linear layers stored in 8 or 4 bits (bitsandbytes).
    quantize: Quantize = "none"
    # Language models: keep the first N decoder blocks of the pretrained model; 0 = all.
    layers: int = 0
    # Language models, one depth per client: client k runs the first depths[k mod len] decoder
    # blocks (a family of cuts of one model, floral.llm.depth; pfedlora, local-hetero). [] = off.
    depths: list[int] = field(default_factory=list)

    RANGES: ClassVar[dict[str, Range]] = {
        "hidden": Range("[1, inf)"),
        "layers": Range("[0, inf)", zero="all"),
        "depths": Range("[1, inf)"),  # and at most the model's blocks (floral.llm.depth)
    }


def resolve_name(cfg: ModelConfig, task: FederatedTask) -> tuple[str, list[int]]:
    """The concrete model name and hidden widths that `cfg` means for `task`."""
    if cfg.name not in MODEL_NAMES and not _is_language_model(cfg.name):
        choices = ", ".join((*MODEL_NAMES, "hf:<path>", "tiny-llama", "tiny-gpt2"))
        raise ConfigError(f"model.name: unknown '{cfg.name}' (choose from {choices})")
    if cfg.name == "auto":
        if task.name not in _AUTO:
            raise ConfigError(f"model.name: no automatic model for dataset '{task.name}'; name one")
        name, hidden = _AUTO[task.name]
        return name, list(hidden)
    return cfg.name, list(cfg.hidden)


def build_model(cfg: ModelConfig, task: FederatedTask) -> nn.Module:
    """A model for `task`: freshly initialized (seed torch beforehand for a repeatable init),
    then loaded from `cfg.init_from` if set."""
    model = _fresh_model(cfg, task)
    if cfg.init_from:
        load_pretrained(model, cfg.init_from)
    return model


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block's activations in the backward pass instead of keeping
    them (`train.gradient_checkpointing`): language models only."""
    from floral.llm.model import CausalLM, enable_checkpointing

    if not isinstance(model, CausalLM):
        raise ConfigError(
            "train.gradient_checkpointing: only for language models (hf:<path>, tiny-llama, "
            f"tiny-gpt2), not {type(model).__name__}"
        )
    enable_checkpointing(model)


def load_pretrained(model: nn.Module, path: str) -> None:
    """Load every floating tensor of `model` from a safetensors file, checking names and shapes.

    A run's `state.safetensors` holds `global/<name>` (and the server's and clients' state);
    only the `global/` tensors are used, without the prefix. Integer buffers (BatchNorm's
    counters) may be missing and keep their initial values.
    """
    stored = _read_safetensors(Path(path))
    if any(key.startswith("global/") for key in stored):
        stored = {k[7:]: v for k, v in stored.items() if k.startswith("global/")}
    state = model.state_dict()
    missing = [n for n, t in state.items() if t.is_floating_point() and n not in stored]
    unknown = [n for n in stored if n not in state]
    if missing or unknown:
        raise ConfigError(
            f"model.init_from: {path} does not match the model: missing {_few(missing)}, "
            f"not in the model {_few(unknown)} (it must come from a run of the same model "
            "without adaptors, e.g. fedavg)"
        )
    wrong = [n for n, v in stored.items() if v.shape != state[n].shape]
    if wrong:
        name = wrong[0]
        raise ConfigError(
            f"model.init_from: {path}: {name} has shape {tuple(stored[name].shape)}, the model's "
            f"is {tuple(state[name].shape)}"
        )
    with torch.no_grad():
        for name, value in stored.items():
            state[name].copy_(value)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"model.init_from: no such file {path}")
    try:
        return aligned(load_file(path))
    except (SafetensorError, OSError) as error:
        raise ConfigError(f"model.init_from: {path} is not a safetensors file ({error})") from None


def _few(names: list[str]) -> str:
    if not names:
        return "none"
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _is_language_model(name: str) -> bool:
    from floral.llm.model import is_llm_name  # no transformers import until a model is built

    return is_llm_name(name)


def _language_model(name: str, task: FederatedTask, cfg: ModelConfig) -> nn.Module:
    if task.kind != "causal-lm":
        raise ConfigError(f"model.name: {name} is a language model; {task.name} is not a text task")
    from floral.llm.depth import keep_first_blocks, make_depth_family
    from floral.llm.model import build_causal_lm

    model = build_causal_lm(name, task.num_outputs)
    if cfg.layers:
        keep_first_blocks(model.lm, cfg.layers)
    if cfg.depths:
        make_depth_family(model.lm, cfg.depths)
    return model


def _fresh_model(cfg: ModelConfig, task: FederatedTask) -> nn.Module:
    name, hidden = resolve_name(cfg, task)
    if cfg.layers < 0:
        raise ConfigError(f"model.layers: must be >= 0 (0 = all), got {cfg.layers}")
    if _is_language_model(name):
        return _language_model(name, task, cfg)
    for key in ("layers", "depths"):
        if getattr(cfg, key):
            raise ConfigError(
                f"model.{key}: only for language models (hf:<path>, tiny-*), not {name}"
            )
    if task.kind == "causal-lm":
        raise ConfigError(
            f"model.name: {name} does not read tokens; {task.name} needs a language model"
            " (hf:smollm2, hf:<path>, tiny-llama)"
        )
    in_features = math.prod(task.input_shape)
    if name == "linear":
        return LinearModel(in_features, task.num_outputs)
    if name == "mlp":
        bad = [w for w in hidden if not isinstance(w, int) or isinstance(w, bool) or w < 1]
        if bad:
            raise ConfigError(f"model.hidden: widths must be positive integers, got {hidden}")
        return MLP(in_features, hidden, task.num_outputs)
    if len(task.input_shape) != 3:
        raise ConfigError(
            f"model.name: '{name}' needs images (C, H, W); {task.name} gives {task.input_shape}"
        )
    image_shape = (task.input_shape[0], task.input_shape[1], task.input_shape[2])
    if name == "cnn":
        return PaperCNN(image_shape, task.num_outputs)
    if name == "hetero-cnn":
        return HeteroFamily(image_shape, task.num_outputs)
    if name in HETERO_NAMES:
        return HeteroCNN(int(name.rpartition("-")[2]), image_shape, task.num_outputs)
    return VGG8(image_shape, task.num_outputs)
