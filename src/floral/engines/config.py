"""The `[engine]` table: which engine runs, how often it evaluates and checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from floral.config import Range, check_choice, check_ranges, choices
from floral.errors import ConfigError
from floral.train.device import resolve_device

__all__ = [
    "ENGINES",
    "BatchClients",
    "EngineConfig",
    "EngineName",
    "EvalClients",
    "check_engine_config",
]

EngineName = Literal["local", "flower"]
BatchClients = int | Literal["auto"]
EvalClients = Literal["all", "sampled"]
ENGINES: tuple[str, ...] = choices(EngineName)


@dataclass
class EngineConfig:
    """The `[engine]` table."""

    name: EngineName = "local"
    eval_every: int = 10  # evaluate every N rounds (and after the last)
    eval_clients: EvalClients = "all"  # all, or only the round's sampled clients
    checkpoint_every: int = 0  # 0 = only the final state
    # Sampled clients of equal data size that train at once, as one batch (floral.engines.
    # batched): "auto" = all of them wherever the method is batchable and the batched tensor
    # step covers the model's layers; N = at most N per batch, with vmap for other layers;
    # 0 = one by one.
    batch_clients: BatchClients = "auto"
    # Where clients train: auto (a CUDA GPU when torch sees one, else the CPU) | cpu | cuda |
    # cuda:N | mps. Uploads, private states, checkpoints and results stay on the CPU.
    device: str = "auto"
    compile: bool = False  # run the clients' forward under torch.compile
    # torch's intra-op threads in this process while clients train and evaluate; 0 = one
    # for small models (where threads cost more than they save), torch's default otherwise.
    threads: int = 0
    # A round must apply at least this many clients' updates, else the run stops there (after
    # Flower's min_fit_clients); with accept_failures = false, one dropped reply stops it.
    min_fit_clients: int = 1
    accept_failures: bool = True
    # A round whose mean training loss is over this many times the initial model's test loss
    # (round 0) has diverged: the run stops at the round before; 0 = only non-finite losses.
    divergence_factor: float = 10.0

    RANGES: ClassVar[dict[str, Range]] = {
        "eval_every": Range("[1, inf)"),
        "checkpoint_every": Range("[0, inf)", zero="only the final state"),
        "batch_clients": Range("[0, inf)", zero="one by one"),
        "threads": Range("[0, inf)"),
        "min_fit_clients": Range("[1, inf)"),
        "divergence_factor": Range("[0, inf)", zero="off"),
    }


def check_engine_config(config: EngineConfig) -> None:
    """Value checks, each a one-line error naming the key."""
    check_choice("engine.name", config.name, EngineName)
    check_choice("engine.eval_clients", config.eval_clients, EvalClients)
    batch = config.batch_clients
    if batch != "auto" and type(batch) is not int:  # the TOML reader checks this; Python may not
        raise ConfigError(f"engine.batch_clients: expected an integer or 'auto', got {batch!r}")
    check_ranges(config, "engine")
    resolve_device(config.device)
