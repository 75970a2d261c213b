"""What to adapt and how: the settings of `attach`, checked when they are built."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, TypeGuard

from floral.config import choices
from floral.errors import ConfigError

__all__ = ["AdapterSpec", "RouterSpec", "LAYER_TYPES", "CONV_FORMS", "ConvForm", "LayerType"]

LayerType = Literal["linear", "conv2d", "embedding", "norm"]
ConvForm = Literal["separable", "kxk-1x1"]
LAYER_TYPES: tuple[str, ...] = choices(LayerType)
CONV_FORMS: tuple[str, ...] = choices(ConvForm)


@dataclass
class RouterSpec:
    """How a client's mixture weights pi come from its logits.

    pi = softmax((logits + noise) / temperature), with noise uniform in [0, `noise`) drawn
    from torch's global RNG in training mode only. With `shared`, the layers hold one more
    adaptor, always on with weight 1 and outside the softmax: what every client has in common
    goes there, so the routed adaptors are left with what tells the clients apart.
    """

    per_layer: bool = False
    temperature: float = 1.0
    noise: float = 1.0
    shared: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.per_layer, bool):
            raise ConfigError(f"router.per_layer = {self.per_layer!r}: must be true or false")
        if not _is_number(self.temperature) or self.temperature <= 0:
            raise ConfigError(f"router.temperature = {self.temperature!r}: must be a number > 0")
        if not _is_number(self.noise) or self.noise < 0:
            raise ConfigError(f"router.noise = {self.noise!r}: must be a number >= 0")
        if not isinstance(self.shared, bool):
            raise ConfigError(f"router.shared = {self.shared!r}: must be true or false")


@dataclass
class AdapterSpec:
    """Which layers get a mixture of `num_adaptors` low-rank adaptors, and their shape.

    With a shared adaptor (`router.shared`, C > 1) every layer holds C + 1 adaptors, the
    shared one last (`slots`).

    `rank` is an int, or a fraction rho of each layer (see `resolve_rank`). `include` and
    `exclude` are fnmatch patterns on qualified module names (`features.0`, `fc*`); an empty
    `include` keeps every layer of `layer_types`. Lists are accepted wherever tuples are.
    """

    num_adaptors: int = 1
    rank: int | float = 0.01
    min_rank: int = 1
    alpha: float = 1.0
    bias: bool = True
    layer_types: tuple[str, ...] = ("linear", "conv2d")
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    conv_form: ConvForm = "separable"
    router: RouterSpec = field(default_factory=RouterSpec)

    def __post_init__(self) -> None:
        self.layer_types = _as_names("layer_types", self.layer_types)
        self.include = _as_names("include", self.include)
        self.exclude = _as_names("exclude", self.exclude)
        if isinstance(self.router, dict):
            self.router = RouterSpec(**self.router)
        self.validate()

    @property
    def slots(self) -> int:
        """Adaptors per layer: the C routed ones, and the shared one if the router has it."""
        return self.num_adaptors + int(self.num_adaptors > 1 and self.router.shared)

    def validate(self) -> None:
        if not _is_int(self.num_adaptors) or self.num_adaptors < 1:
            raise ConfigError(f"num_adaptors = {self.num_adaptors!r}: must be an integer >= 1")
        if not _is_int(self.min_rank) or self.min_rank < 1:
            raise ConfigError(f"min_rank = {self.min_rank!r}: must be an integer >= 1")
        check_rank(self.rank)
        if not _is_number(self.alpha):
            raise ConfigError(f"alpha = {self.alpha!r}: must be a number")
        if not isinstance(self.bias, bool):
            raise ConfigError(f"bias = {self.bias!r}: must be true or false")
        unknown = [name for name in self.layer_types if name not in LAYER_TYPES]
        if unknown or not self.layer_types:
            raise ConfigError(
                f"layer_types = {list(self.layer_types)!r}: choose a non-empty subset of "
                f"{', '.join(LAYER_TYPES)}"
            )
        if self.conv_form not in CONV_FORMS:
            raise ConfigError(
                f"conv_form = {self.conv_form!r}: must be one of {', '.join(CONV_FORMS)}"
            )
        if not isinstance(self.router, RouterSpec):
            raise ConfigError(f"router = {self.router!r}: must be a RouterSpec or a table")
        self.router.validate()


def check_rank(rank: object) -> None:
    if _is_int(rank):
        if rank < 1:
            raise ConfigError(f"rank = {rank!r}: an integer rank must be >= 1")
    elif isinstance(rank, float):
        if not 0.0 < rank <= 1.0:
            raise ConfigError(f"rank = {rank!r}: a fractional rank must be in (0, 1]")
    else:
        raise ConfigError(f"rank = {rank!r}: must be an integer or a fraction in (0, 1]")


def _as_names(key: str, value: Iterable[str] | str) -> tuple[str, ...]:
    names = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(name, str) for name in names):
        raise ConfigError(f"{key} = {value!r}: must be a list of strings")
    return names


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
