"""Where and how a client step runs: the device, the compute precision, compilation, threads.

The model and a client's working tensors live on the step's device; data batches move there
one at a time; everything that leaves a step (uploads, private state, evaluation sums) comes
back on the CPU, so that results folders and messages never depend on the device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from floral.config import check_choice, choices
from floral.errors import ConfigError

__all__ = [
    "CPU",
    "DTYPES",
    "Dtype",
    "Placement",
    "cast_tensors",
    "check_dtype",
    "default_threads",
    "on_cpu",
    "resolve_device",
    "seeded_rng",
    "threads",
    "to_device",
]

CPU = torch.device("cpu")
Dtype = Literal["float32", "bfloat16", "float16"]
DTYPES = dict(zip(choices(Dtype), (torch.float32, torch.bfloat16, torch.float16), strict=True))
# Below this much work per training step (parameters x examples per batch), one intra-op
# thread beats torch's default: splitting tiny matmuls across threads costs more than it saves
# (docs/benchmarks.md, "Threads", measured with benchmarks/threads.py).
SMALL_STEP_WORK = 50_000_000
# The torch.compile backend of `engine.compile` (tests use a cheaper one).
COMPILE_BACKEND = "inductor"


@dataclass(frozen=True)
class Placement:
    """How a client step runs: on `device`, the frozen base's matmuls in `dtype` (autocast when
    it is not float32; trained tensors and their optimizer state stay float32), the forward
    compiled with `torch.compile` when `compile` is set."""

    device: torch.device = field(default=CPU)
    dtype: torch.dtype = torch.float32
    compile: bool = False

    @property
    def mixed(self) -> bool:
        return self.dtype != torch.float32

    def autocast(self) -> AbstractContextManager[Any]:
        """Mixed precision for a forward (and its loss), or nothing at float32."""
        if not self.mixed:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def resolve_device(spec: str, key: str = "engine.device") -> torch.device:
    """The torch device that `spec` names (auto | cpu | cuda | cuda:N | mps), checked to exist
    here; a one-line ConfigError naming `key` otherwise."""
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else CPU
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{key}: unknown {spec!r} (choose from auto, cpu, cuda, cuda:N, mps)")
    if device.type == "cpu":
        return CPU
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{key}: {spec!r} asked, but torch sees no CUDA device here")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"{key}: {spec!r} asked, but torch sees {count} CUDA device(s)")
        return torch.device("cuda", device.index if device.index is not None else 0)
    if not torch.backends.mps.is_available():
        raise ConfigError(f"{key}: 'mps' asked, but this machine has no Apple GPU for torch")
    return device


def check_dtype(name: str, device: torch.device, key: str = "model.dtype") -> torch.dtype:
    """The torch dtype `name` means, checked to run on `device`."""
    check_choice(key, name, Dtype)
    dtype = DTYPES[name]
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"{key}: bfloat16 asked, but {torch.cuda.get_device_name(device)} has no bfloat16;"
            " use float16"
        )
    return dtype


@torch.no_grad()
def cast_tensors(model: nn.Module, names: Iterable[str], dtype: torch.dtype) -> None:
    """Store the named floating-point parameters and buffers of `model` in `dtype`, in place
    (a tied tensor, held by two modules, once)."""
    if dtype is torch.float32:
        return
    for name in names:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        parameter = module._parameters.get(attr)
        buffer = module._buffers.get(attr)
        if parameter is not None and parameter.is_floating_point():
            parameter.data = parameter.data.to(dtype)
        elif buffer is not None and buffer.is_floating_point():
            module._buffers[attr] = buffer.to(dtype)


def to_device(tensors: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The tensors on `device`; those already there are not copied."""
    return {name: value.to(device, non_blocking=True) for name, value in tensors.items()}


def on_cpu(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors on the CPU, as everything that leaves a client step is."""
    return {name: value.to(CPU) for name, value in tensors.items()}


@contextmanager
def seeded_rng(seed: int, device: torch.device = CPU) -> Iterator[None]:
    """Seed torch's CPU generator, and `device`'s own, for a block, then restore them (router
    noise, dropout: drawn on the device the model lives on).

    Only these generators: `torch.manual_seed` also queues seeds for every accelerator
    backend, which costs more than a small client's whole local step.
    """
    generators = [torch.default_generator]
    if device.type == "cuda":
        generators.append(torch.cuda.default_generators[device.index or 0])
    elif device.type == "mps":
        generators.append(torch.mps._get_default_mps_generator())
    saved = [g.get_state() for g in generators]
    for generator in generators:
        generator.manual_seed(seed)
    try:
        yield
    finally:
        for generator, state in zip(generators, saved):
            generator.set_state(state)


def default_threads(model: nn.Module, batch_size: int) -> int:
    """Intra-op threads for training `model` at `batch_size` in this process: one for a small
    step; 0 (leave them as they are: torch's default, or one per worker of a grid) otherwise."""
    work = sum(p.numel() for p in model.parameters()) * batch_size
    return 1 if work < SMALL_STEP_WORK else 0


@contextmanager
def threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to `count` for a block (0: leave them)."""
    if count <= 0 or count == torch.get_num_threads():
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def compiled(model: nn.Module) -> Callable[..., torch.Tensor]:
    """`model`'s forward under torch.compile; callers build it once per model (StateSlots.memo)
    and load every client's tensors in place, so one compiled graph serves all of them."""
    return torch.compile(model, backend=COMPILE_BACKEND)  # type: ignore[return-value]
