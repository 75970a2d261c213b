"""PEFT LoRA files in and out: `adapter_config.json` + `adapter_model.safetensors`.

PEFT stores one LoRA per linear layer as `lora_A` (r, in) and `lora_B` (out, r), scaled by
lora_alpha / r, under keys `base_model.model.<module>.lora_A.weight`. floral stores C adaptors
per layer as A (C, r, in) and B (C, r, out) (B transposed), scaled by alpha and mixed by pi.

Export. A client's mixture sum_c pi_c B_c A_c is a sum of C rank-r products, so it is exactly
one LoRA of rank C*r: A stacked, B stacked with pi_c * alpha folded in, and lora_alpha = r so
PEFT's scaling is 1. Layers of smaller rank are padded with zero ranks to the largest. The
adaptive bias sum_c pi_c b_c maps onto PEFT's `lora_bias` (a bias on lora_B, PEFT >= 0.14);
it is written only when nonzero, so a model trained with bias = false gives a plain LoRA.
Only linear layers export (PEFT's LoRA for embeddings and convolutions is another shape).

Import. A PEFT LoRA of rank r' <= r goes into the first r' ranks of every adaptor of each
layer, the rest of B set to zero (A keeps its random init, so those ranks still learn). All C
adaptors then equal the PEFT LoRA, and the model gives PEFT's logits whatever pi is. Or, with
`into="base"`, the PEFT delta is merged into the base weights.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from floral.adapters.attach import adapted_layers
from floral.adapters.layers import AdaptedLayer, AdaptedLinear
from floral.errors import ConfigError
from floral.llm.deps import require
from floral.llm.model import CausalLM
from floral.train.state import aligned

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "PEFT_PREFIX",
    "export_peft",
    "export_shared_peft",
    "import_peft",
    "peft_tensors",
]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def export_peft(
    model: nn.Module,
    out_dir: str | Path,
    router_weights: Tensor | None = None,
    adaptor: int | None = None,
) -> Path:
    """Write `model`'s adaptors as a PEFT LoRA folder; returns it.

    By default the mixture each layer uses in eval mode (the loaded client's pi); or
    `router_weights` (C,) or (L, C); or, with `adaptor=c`, shared adaptor c alone (rank r).
    """
    tensors, rank, with_bias = peft_tensors(model, router_weights, adaptor)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = _peft_config(model, sorted({_module_name(model, k) for k in tensors}), rank,
                          with_bias)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    require("safetensors.torch").save_file(tensors, str(out / WEIGHTS_FILE))
    return out


def export_shared_peft(model: nn.Module, out_dir: str | Path) -> list[Path]:
    """Each of the C shared adaptors as its own PEFT LoRA folder `out_dir/adaptor-<c>`."""
    count = _num_adaptors(model)
    return [export_peft(model, Path(out_dir) / f"adaptor-{c}", adaptor=c) for c in range(count)]


@torch.no_grad()
def peft_tensors(
    model: nn.Module, router_weights: Tensor | None = None, adaptor: int | None = None
) -> tuple[dict[str, Tensor], int, bool]:
    """(PEFT key -> tensor, the common rank, whether a lora_B bias is written)."""
    layers = _linear_layers(model)
    factors = {name: _merged_factors(layer, router_weights, adaptor)
               for name, layer in layers.items()}
    rank = max(a.shape[0] for a, _, _ in factors.values())
    with_bias = any(b is not None and bool(b.any()) for _, _, b in factors.values())
    tensors: dict[str, Tensor] = {}
    for name, (a, b, bias) in factors.items():
        key = PEFT_PREFIX + _hf_name(model, name)
        pad = rank - a.shape[0]
        tensors[f"{key}.lora_A.weight"] = nn.functional.pad(a, (0, 0, 0, pad)).contiguous()
        tensors[f"{key}.lora_B.weight"] = nn.functional.pad(b, (0, pad)).contiguous()
        if with_bias:
            out_features = b.shape[0]
            tensors[f"{key}.lora_B.bias"] = (
                bias.contiguous() if bias is not None else torch.zeros(out_features, dtype=b.dtype)
            )
    return tensors, rank, with_bias


def _merged_factors(
    layer: AdaptedLinear, router_weights: Tensor | None, adaptor: int | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """A (K*r, in), B (out, K*r) with pi * alpha folded in, and the mixed bias (out,)."""
    if adaptor is not None:
        if not 0 <= adaptor < layer.num_adaptors:
            raise ConfigError(f"adaptor = {adaptor}: the model has {layer.num_adaptors} adaptors")
        pi = torch.zeros(layer.num_adaptors, dtype=layer.lora_A.dtype)
        pi[adaptor] = 1.0
        keep = slice(adaptor, adaptor + 1)
    else:
        pi = _layer_weights(layer, router_weights)
        keep = slice(None)
    scale = (pi * layer.alpha)[keep]
    a = layer.lora_A[keep].flatten(0, 1).detach().clone()
    b = (layer.lora_B[keep] * scale.view(-1, 1, 1)).flatten(0, 1).t().detach().clone()
    lora_bias = layer._parameters.get("lora_bias")
    bias = None if lora_bias is None else (scale @ lora_bias[keep]).detach().clone()
    return a, b, bias


def _layer_weights(layer: AdaptedLayer, router_weights: Tensor | None) -> Tensor:
    if router_weights is None:
        return layer.eval_mixture().detach()
    weights = torch.as_tensor(router_weights, dtype=layer.lora_A.dtype)
    if weights.dim() == 2:
        weights = weights[layer.layer_index]
    if tuple(weights.shape) != (layer.num_adaptors,):
        raise ConfigError(
            f"router_weights of shape {tuple(weights.shape)}: expected "
            f"({layer.num_adaptors},) or (L, {layer.num_adaptors})"
        )
    return weights


def _peft_config(model: nn.Module, targets: list[str], rank: int, with_bias: bool) -> dict:
    conv1d = isinstance(model, CausalLM) and any(
        n in model.conv1d_names for n in targets
    )
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if isinstance(model, CausalLM) else None,
        "base_model_name_or_path": getattr(model, "source", "") or None,
        "r": rank,
        "lora_alpha": rank,  # scaling 1: pi and alpha are folded into lora_B
        "lora_dropout": 0.0,
        "target_modules": targets,
        "bias": "none",
        "lora_bias": with_bias,
        "fan_in_fan_out": conv1d,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def import_peft(model: nn.Module, adapter_dir: str | Path, into: str = "adaptors") -> list[str]:
    """Load a PEFT LoRA folder into `model`; returns the modules it changed.

    into="adaptors": every adaptor of each adapted layer starts as the PEFT LoRA (the model
    must have adaptors on those layers, of rank >= PEFT's). into="base": the LoRA is merged
    into the base weights (adaptors, if any, are left as they are).
    """
    if into not in ("adaptors", "base"):
        raise ConfigError(f"into = {into!r}: choose adaptors or base")
    folder = Path(adapter_dir)
    config = _read_config(folder)
    factors = _read_factors(folder, config)
    layers = adapted_layers(model)
    changed = []
    for module, (a, b, bias) in factors.items():
        name = _floral_name(model, module)
        scale = _scaling(config, module, a.shape[0])
        if into == "base":
            _merge_into_base(model, layers, name, a, b, bias, scale)
        else:
            _load_into_adaptors(layers, name, a, b, bias, scale)
        changed.append(module)
    return changed


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{folder}: no {CONFIG_FILE} (not a PEFT adapter folder)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: not a PEFT adapter config (a JSON object)")
    if config.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{path}: peft_type {config.get('peft_type')!r}; only LORA is read")
    if config.get("use_dora"):
        raise ConfigError(f"{path}: a DoRA adapter (use_dora) has no floral equivalent")
    if config.get("bias", "none") != "none":
        raise ConfigError(f"{path}: bias = {config['bias']!r} trains base biases; only 'none'")
    return config


def _read_factors(
    folder: Path, config: Mapping[str, Any]
) -> dict[str, tuple[Tensor, Tensor, Tensor | None]]:
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise ConfigError(f"{folder}: no {WEIGHTS_FILE}")
    try:
        state = aligned(require("safetensors.torch").load_file(str(path)))
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
        raise ConfigError(f"{path}: not a readable safetensors file ({error})") from None
    parts: dict[str, dict[str, Tensor]] = {}
    pattern = re.compile(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias)")
    for key, tensor in state.items():
        match = pattern.fullmatch(key.removeprefix(PEFT_PREFIX))
        if match is None:
            raise ConfigError(f"{path}: {key!r} is not a LoRA factor of a linear layer")
        parts.setdefault(match[1], {})[match[2]] = tensor.float()
    factors = {}
    for module, found in parts.items():
        if "lora_A.weight" not in found or "lora_B.weight" not in found:
            raise ConfigError(f"{path}: {module} lacks lora_A or lora_B")
        factors[module] = (found["lora_A.weight"], found["lora_B.weight"], found.get("lora_B.bias"))
    return factors


def _scaling(config: Mapping[str, Any], module: str, rank: int) -> float:
    """PEFT's scaling of one module: lora_alpha / r (or / sqrt(r) with rsLoRA); the alpha of
    `alpha_pattern` when one of its keys matches the module name."""
    alpha = config.get("lora_alpha", 8)
    for key, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            alpha = value
            break
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _load_into_adaptors(
    layers: Mapping[str, AdaptedLayer], name: str, a: Tensor, b: Tensor,
    bias: Tensor | None, scale: float,
) -> None:
    layer = layers.get(name)
    if not isinstance(layer, AdaptedLinear):
        raise ConfigError(f"import_peft: {name} has no linear adaptors; attach them first")
    rank = a.shape[0]
    widths = (layer.lora_A.shape[2], layer.lora_B.shape[2])
    if rank > layer.rank or (a.shape[1], b.shape[0]) != widths:
        raise ConfigError(
            f"import_peft: {name}: PEFT LoRA of rank {rank}, {a.shape[1]} -> {b.shape[0]} does "
            f"not fit adaptors of rank {layer.rank}, {layer.lora_A.shape[2]} -> "
            f"{layer.lora_B.shape[2]}"
        )
    with torch.no_grad():
        layer.lora_A[:, :rank] = a.to(layer.lora_A)
        layer.lora_B.zero_()
        layer.lora_B[:, :rank] = (b.t() * (scale / layer.alpha)).to(layer.lora_B)
        lora_bias = layer._parameters.get("lora_bias")
        if lora_bias is not None:
            lora_bias.zero_()
        if bias is not None:
            if lora_bias is None:
                raise ConfigError(f"import_peft: {name}: the LoRA has a bias; attach with bias")
            lora_bias[:] = (bias * (scale / layer.alpha)).to(lora_bias)


def _merge_into_base(
    model: nn.Module, layers: Mapping[str, AdaptedLayer], name: str, a: Tensor, b: Tensor,
    bias: Tensor | None, scale: float,
) -> None:
    module = layers[name].base if name in layers else _submodule(model, name)
    if not isinstance(module, nn.Linear):
        raise ConfigError(f"import_peft: {name} is not a linear layer")
    with torch.no_grad():
        module.weight.add_((b @ a).to(module.weight), alpha=scale)
        if bias is not None:
            if module.bias is None:
                module.bias = nn.Parameter(torch.zeros_like(module.weight[:, 0]),
                                           requires_grad=module.weight.requires_grad)
            module.bias.add_(bias.to(module.bias), alpha=scale)


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ConfigError(f"import_peft: the model has no module {name!r}") from None


def _linear_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    layers = adapted_layers(model)
    if not layers:
        raise ConfigError("export_peft: the model has no adaptors attached")
    other = [n for n, layer in layers.items() if not isinstance(layer, AdaptedLinear)]
    if other:
        raise ConfigError(
            f"export_peft: only linear layers export to PEFT LoRA; {len(other)} others are "
            f"adapted ({other[0]}, ...): exclude them"
        )
    return layers  # type: ignore[return-value]  # all AdaptedLinear, checked above


def _num_adaptors(model: nn.Module) -> int:
    return next(iter(_linear_layers(model).values())).num_adaptors


def _wrapper_prefix(model: nn.Module) -> str:
    return "lm." if isinstance(model, CausalLM) else ""


def _hf_name(model: nn.Module, name: str) -> str:
    """floral's module name -> the transformers model's (`lm.model.x` -> `model.x`)."""
    return name.removeprefix(_wrapper_prefix(model))


def _floral_name(model: nn.Module, module: str) -> str:
    return _wrapper_prefix(model) + module


def _module_name(model: nn.Module, key: str) -> str:
    """`base_model.model.model.layers.0.q_proj.lora_A.weight` -> `model.layers.0.q_proj`."""
    return key.removeprefix(PEFT_PREFIX).rsplit(".", 2)[0]
