"""Typed settings from TOML tables: dataclasses in, one-line errors out.

Every table of an experiment maps onto a dataclass; unknown keys, values of the wrong type and
numbers that are not finite (nan, inf, -inf) stop with a `ConfigError` that names the full
dotted key, before any work starts. A setting that is one of fixed choices is typed
`Literal[...]`, and its error lists the choices from the type itself (`check_choice`).

A table whose meaningful keys depend on one of its values (`[task]`: the dataset's options)
says so with a classmethod `key_scope(data, prefix) -> KeyScope | None`; `from_dict` then
refuses, naming the owner, any key outside the scope that is not at its default.

Every numeric setting declares the values it may take beside its dataclass, in a table
`RANGES: ClassVar[dict[str, Range]]` (merged down the class hierarchy: an options class
inherits its base's ranges), and one checker, `check_ranges`, holds every setting of a config
to them before any work:

    RANGES = {"lr": Range("(0, inf)"), "momentum": Range("[0, 1)"),
              "betas": Range("[0, 1)", length=2), "rank": Range("[1, inf)", fraction="(0, 1]")}
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from floral.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "KeyScope",
    "Range",
    "check_choice",
    "check_ranges",
    "choices",
    "declared_ranges",
    "field_default",
    "from_dict",
    "parse_value",
    "set_dotted",
    "to_dict",
    "tomllib",
]

T = TypeVar("T")


@dataclass(frozen=True)
class KeyScope:
    """The keys of a table that mean something for one of its values, e.g. a dataset's options."""

    owner: str  # what the keys belong to, as a message names it: "dataset 'mnist'"
    keys: tuple[str, ...]

    def refuse(self, key: str, unknown: bool = False) -> ConfigError:
        what = "unknown key, not" if unknown else "not"
        return ConfigError(
            f"{key}: {what} an option of {self.owner} (its options: {', '.join(self.keys)})"
        )


_COUNTS = {1: "one", 2: "two", 3: "three", 4: "four"}


@dataclass(frozen=True)
class Range:
    """The values one numeric setting may take, as an interval written the usual way:
    "[0, 1)", "(0, inf)", "[1, inf)", "[0, 2**64)" (an end is a number, inf, or a power a**b).

    `zero`: 0 is allowed as well, and means this ("off", "one per cluster"). `fraction`: an
    `int | float` setting whose integers lie in the interval and whose floats (fractions of
    something) in this one. `length`: a list setting has exactly this many items (0 = any); the
    interval then holds for each item.
    """

    interval: str
    zero: str = ""
    fraction: str = ""
    length: int = 0

    def __post_init__(self) -> None:
        _parse_interval(self.interval)  # a malformed declaration fails on import
        if self.fraction:
            _parse_interval(self.fraction)

    def allows(self, value: float) -> bool:
        """Whether one number lies in the range (a float of a `fraction` setting in that)."""
        if self.zero and value == 0:
            return True
        interval = self.fraction if self.fraction and isinstance(value, float) else self.interval
        low, high, low_open, high_open = _parse_interval(interval)
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        return above and below

    def check(self, key: str, value: Any) -> None:
        """A one-line ConfigError naming `key` unless `value` (a number, or a list of them)
        lies in the range."""
        if isinstance(value, list | tuple):
            numbers = [v for v in value if _is_number(v)]
            if (self.length and len(value) != self.length) or not all(map(self.allows, numbers)):
                raise ConfigError(f"{key}: {self._describe_items()}, got {list(value)}")
        elif _is_number(value) and not self.allows(value):
            raise ConfigError(f"{key}: {self.describe(value)}, got {value!r}")

    def describe(self, value: object = None) -> str:
        """What the range asks, as a message says it: "must be in [0, 1)", "must be at least 1",
        "must be 0 (off) or more"; a fraction out of its range: "a fraction must be in (0, 1]"."""
        if self.fraction and isinstance(value, float) and not self.zero:
            return f"a fraction must be in {self.fraction}"
        words = _words(self.interval)
        if self.zero and words == ">= 0":
            parts = [f"0 ({self.zero})", "more"]
        else:
            parts = [f"0 ({self.zero})"] * bool(self.zero) + [words]
        if self.fraction:
            parts.append(f"a fraction in {self.fraction}")
        return "must be " + (" or ".join(parts) if len(parts) < 3
                             else f"{', '.join(parts[:-1])} or {parts[-1]}")

    def _describe_items(self) -> str:
        low, high, _, _ = _parse_interval(self.interval)
        bounded = math.isfinite(low) or math.isfinite(high)
        if self.length:
            count = _COUNTS.get(self.length, str(self.length))
            return f"{count} numbers" + (f" in {self.interval}" if bounded else "")
        return f"each {self.describe()}"

    def bounds(self) -> tuple[float, float, bool, bool]:
        """(low, high, low_open, high_open) of the interval."""
        return _parse_interval(self.interval)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _words(interval: str) -> str:
    low, high, low_open, high_open = _parse_interval(interval)
    low_text = interval[1:].split(",")[0].strip()
    if math.isinf(high):
        if low_open:
            return f"> {low_text}"
        return ">= 0" if low == 0 else f"at least {low_text}"
    return f"in {interval}"


@functools.cache
def _parse_interval(interval: str) -> tuple[float, float, bool, bool]:
    if len(interval) < 5 or interval[0] not in "[(" or interval[-1] not in "])":
        raise ValueError(f"not an interval like [0, 1): {interval!r}")
    low, sep, high = interval[1:-1].partition(",")
    if not sep:
        raise ValueError(f"not an interval like [0, 1): {interval!r}")
    return _end(low), _end(high), interval[0] == "(", interval[-1] == ")"


def _end(text: str) -> float:
    text = text.strip()
    if "**" in text:
        base, _, exponent = text.partition("**")
        return int(base) ** int(exponent)
    try:
        return int(text)
    except ValueError:
        return float(text)


def declared_ranges(cls: type) -> dict[str, Range]:
    """Field name -> Range of dataclass `cls`: its `RANGES` over those of its bases."""
    ranges: dict[str, Range] = {}
    for klass in reversed(cls.__mro__):
        ranges.update(vars(klass).get("RANGES", {}))
    return ranges


def check_ranges(obj: Any, prefix: str) -> None:
    """Every declared range of dataclass `obj` (and of the dataclasses it holds), in field order:
    the first value outside its range stops with a one-line ConfigError naming its key."""
    ranges = declared_ranges(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = _join(prefix, f.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, key)
        elif f.name in ranges:
            ranges[f.name].check(key, value)


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str) -> T:
    """Build dataclass `cls` from `data`, checking every key and type; `prefix` names the table."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix}: expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    scope_of = getattr(cls, "key_scope", None)
    scope: KeyScope | None = scope_of(data, prefix) if scope_of is not None else None
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            if scope is not None:
                raise scope.refuse(_join(prefix, _show_key(key)), unknown=True)
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{_join(prefix, _show_key(key))}: unknown key (known: {known})")
        kwargs[key] = _coerce(value, hints[key], _join(prefix, key))
        if scope is not None:
            _check_in_scope(scope, fields[key], kwargs[key], _join(prefix, key))
    return cls(**kwargs)


def _check_in_scope(scope: KeyScope, f: dataclasses.Field, value: Any, key: str) -> None:
    # A key at its default changes nothing, and resolved configs (a results folder's
    # config.toml) list every setting: they must read back.
    if f.name not in scope.keys and value != field_default(f):
        raise scope.refuse(key)


def field_default(f: dataclasses.Field) -> Any:
    """The value a dataclass field takes when it is not given."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def choices(hint: Any) -> tuple[Any, ...]:
    """The values that `Literal[...]` type `hint` (or an alias of one) allows, in its order."""
    hint = getattr(hint, "__value__", hint)  # a `type X = Literal[...]` statement's alias
    if typing.get_origin(hint) is not typing.Literal:
        raise TypeError(f"{hint!r} is not a Literal type")
    return typing.get_args(hint)


def check_choice(key: str, value: Any, hint: Any) -> None:
    """A one-line ConfigError naming `key` unless `value` is one of Literal `hint`'s choices."""
    allowed = choices(hint)
    # By type too: True == 1, and a choice 1 must not accept true.
    if not any(type(value) is type(c) and value == c for c in allowed):
        raise ConfigError(f"{key}: unknown {value!r} (choose from {', '.join(map(str, allowed))})")


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as plain TOML-ready values (tuples become lists)."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def parse_value(text: str) -> Any:
    """A `--set` value: a TOML literal (1, 0.5, true, [1, 2], "x"), else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c = value` in nested dicts, creating tables on the way."""
    *tables, key = dotted.split(".")
    node = data
    for table in tables:
        node = node.setdefault(table, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {table!r} is a value, not a table")
    node[key] = value


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _show_key(key: object) -> str:
    """A key as written in a message: as is, or quoted when it is not a plain printable name
    (a quoted TOML key may hold a newline, which would break the one-line error)."""
    if isinstance(key, str) and key and key.isprintable() and not any(c.isspace() for c in key):
        return key
    return repr(key)


def _is_non_finite_float(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _finite_error(key: str, value: Any) -> ConfigError:
    return ConfigError(f"{key}: expected a finite number, got {value!r}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        check_choice(key, value, hint)
        return value
    if origin in (typing.Union, types.UnionType):
        if float in typing.get_args(hint) and _is_non_finite_float(value):
            raise _finite_error(key, value)  # the precise reason, not "expected X or Y"
        for option in typing.get_args(hint):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_describe(hint)}, got {value!r}")
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        _, item = typing.get_args(hint) or (str, Any)
        return {k: _coerce(v, item, _join(key, _show_key(k))) for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            # NaN passes every `x <= 0` check downstream, and inf is never a sensible
            # setting: every float setting must be finite. An int beyond float's range
            # (TOML integers are unbounded in tomllib) overflows to inf.
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if not math.isfinite(number):
                raise _finite_error(key, value)
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(hint):
        # A type hint is the dataclass itself, never an instance of it.
        return from_dict(cast("type[Any]", hint), value, key)
    raise ConfigError(f"{key}: expected {_describe(hint)}, got {value!r}")


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if origin in (list, tuple):
        return "a list"
    if origin is typing.Literal:
        return f"one of {', '.join(map(str, typing.get_args(hint)))}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )
