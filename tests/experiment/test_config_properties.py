"""Property tests of the typed config reader: whatever an experiment file or `--set` holds, the
result is a valid config or a one-line `ConfigError` that names the offending dotted key.

Settings are enumerated from the dataclasses themselves (and every registered method's
options), so a new setting is covered without touching this file.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from floral.config import from_dict, set_dotted
from floral.errors import ConfigError
from floral.experiment import ExperimentConfig, resolve_config
from floral.methods import _REGISTRY
from floral.train.loop import TrainConfig

# Each example only reads and checks a dict (no data, no model): a few milliseconds.
FAST = settings(
    max_examples=150,
    deadline=None,
    database=None,  # no .hypothesis/ folder in the working tree
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

BASE: dict[str, Any] = {
    "name": "props",
    "task": {"dataset": "synthetic-mlp", "shift": "none", "num_clients": 4, "num_clusters": 2},
    "model": {"name": "mlp", "hidden": [8]},
    "train": {"rounds": 2, "batch_size": 8},
}
NON_FINITE = (math.nan, math.inf, -math.inf)


def _settings_of(cls: type, prefix: str) -> dict[str, Any]:
    """Dotted key -> type hint of every leaf setting of dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key, hint = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(hint):
            out.update(_settings_of(typing.cast(type, hint), key + "."))
        elif key != "method":  # a method's table is read by the method (below)
            out[key] = hint
    return out


# (method name, dotted key, hint) for every setting an experiment can have.
SETTINGS: list[tuple[str, str, Any]] = [
    ("floral", key, hint) for key, hint in _settings_of(ExperimentConfig, "").items()
] + [
    (name, key, hint)
    for name, entry in _REGISTRY.items()
    for key, hint in _settings_of(entry.cls.Options, "method.").items()
]
TABLES = ("", "task", "model", "train", "engine", "comm", "output", "method")


def _is_float_setting(hint: Any) -> bool:
    args = typing.get_args(hint)
    return hint is float or float in args or (typing.get_origin(hint) is list and args == (float,))


FLOAT_SETTINGS = [s for s in SETTINGS if _is_float_setting(s[2])]


def _data(method: str, key: str | None = None, value: Any = None) -> dict[str, Any]:
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    data["method"] = {"name": method}
    if key is not None:
        set_dotted(data, key, value)
    return data


def _assert_names(error: ConfigError, key: str) -> None:
    message = str(error)
    assert len(message.splitlines()) == 1, message
    assert key in message, (key, message)


def test_every_kind_of_setting_is_covered():
    assert len(FLOAT_SETTINGS) >= 20
    assert {"train.lr", "train.router_lr", "train.server_betas", "method.alpha",
            "method.rank", "method.warmup_rank", "method.fusion_init"} <= {
        key for _, key, _ in FLOAT_SETTINGS
    }
    kinds = {typing.get_origin(h) or h for _, _, h in SETTINGS}
    assert {int, float, bool, str, list, types.UnionType} <= kinds


# -- values of the wrong type --------------------------------------------------------------------
_ANY_SCALAR = st.one_of(
    st.text(max_size=8), st.integers(-(2**70), 2**70), st.floats(), st.booleans()
)
_STRINGS = st.text(max_size=8)
_LISTS = st.lists(_ANY_SCALAR, max_size=3)
_TABLES = st.dictionaries(st.text(max_size=4), _ANY_SCALAR, max_size=2)
_NUMBERS = st.one_of(st.integers(-(2**70), 2**70), st.floats())


def _wrong_for(hint: Any) -> st.SearchStrategy[Any]:
    """Values that the reader must refuse for a setting of type `hint`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # method.rank: int | float
        return st.one_of(_STRINGS, st.booleans(), _LISTS, _TABLES)
    if origin is list:
        (item,) = args
        return st.one_of(
            _STRINGS, _NUMBERS, st.booleans(), _TABLES,
            st.tuples(st.lists(st.just(0), max_size=2), _wrong_for(item)).map(
                lambda pair: [*pair[0], pair[1]]  # the wrong item anywhere in the list
            ),
        )
    if origin is dict:
        return st.one_of(_STRINGS, _NUMBERS, st.booleans(), _LISTS)
    if hint is int:  # strings, floats (even 2.0), bools (True is an int in Python)
        return st.one_of(_STRINGS, st.floats(), st.booleans(), _LISTS, _TABLES)
    if hint is float:
        return st.one_of(_STRINGS, st.booleans(), _LISTS, _TABLES)
    if hint is bool:
        return st.one_of(_STRINGS, _NUMBERS, _LISTS, _TABLES)
    if hint is str:
        return st.one_of(_NUMBERS, st.booleans(), _LISTS, _TABLES)
    if origin is typing.Literal:  # a fixed choice: any other string, or not a string at all
        return st.one_of(_STRINGS.filter(lambda s: s not in args), _NUMBERS, st.booleans(),
                         _LISTS, _TABLES)
    raise AssertionError(f"no wrong values for {hint!r}")


@st.composite
def _wrong_setting(draw: st.DrawFn) -> tuple[str, str, Any]:
    method, key, hint = draw(st.sampled_from(SETTINGS))
    return method, key, draw(_wrong_for(hint))


@FAST
@given(_wrong_setting())
def test_a_value_of_the_wrong_type_is_a_one_line_error_naming_its_key(case):
    method, key, value = case
    with pytest.raises(ConfigError) as caught:
        resolve_config(_data(method, key, value))
    _assert_names(caught.value, key)


# -- NaN and infinity -----------------------------------------------------------------------------
@st.composite
def _non_finite_setting(draw: st.DrawFn) -> tuple[str, str, Any]:
    method, key, hint = draw(st.sampled_from(FLOAT_SETTINGS))
    bad = draw(st.one_of(st.sampled_from(NON_FINITE), st.integers(2**1024, 2**1100)))
    if typing.get_origin(hint) is list:  # at a random position among finite numbers
        finite = draw(st.lists(st.floats(0.0, 1.0), max_size=3))
        bad = [*finite[: draw(st.integers(0, len(finite)))], bad, *finite]
    elif isinstance(bad, int) and hint is not float:
        bad = math.inf  # int | float takes any int as an int
    return method, key, bad


@FAST
@given(_non_finite_setting())
def test_nan_and_infinity_are_refused_at_every_float_setting(case):
    method, key, value = case
    with pytest.raises(ConfigError) as caught:
        resolve_config(_data(method, key, value))
    _assert_names(caught.value, key)
    assert "expected a finite number" in str(caught.value)


@FAST
@given(st.sampled_from(FLOAT_SETTINGS), st.sampled_from(["nan", "inf", "-inf", "+inf", "-nan"]))
def test_nan_and_infinity_from_set_are_refused(setting, literal):
    method, key, hint = setting
    if typing.get_origin(hint) is list:
        literal = f"[0.5, {literal}]"
    with pytest.raises(ConfigError) as caught:
        resolve_config(_data(method), [f"method.name={method}", f"{key}={literal}"])
    _assert_names(caught.value, key)


def test_the_error_reads_as_the_issue_asks():
    with pytest.raises(ConfigError, match=r"^train\.lr: expected a finite number, got nan$"):
        resolve_config(_data("floral"), ["train.lr=nan"])
    with pytest.raises(ConfigError, match=r"^train\.router_lr: expected a finite number, got inf$"):
        from_dict(TrainConfig, {"router_lr": math.inf}, "train")
    with pytest.raises(ConfigError, match=r"^method\.rank: expected a finite number, got -inf$"):
        resolve_config(_data("fedit", "method.rank", -math.inf))
    with pytest.raises(ConfigError, match=r"^train\.server_betas\[1\]: expected a finite number"):
        resolve_config(_data("floral", "train.server_betas", [0.9, math.nan]))


# -- unknown keys ---------------------------------------------------------------------------------
def _known(table: str, method: str) -> set[str]:
    if table == "method":
        return {f.name for f in dataclasses.fields(_REGISTRY[method].cls.Options)} | {"name"}
    cls = ExperimentConfig if not table else typing.get_type_hints(ExperimentConfig)[table]
    return {f.name for f in dataclasses.fields(cls)}


@st.composite
def _unknown_key(draw: st.DrawFn) -> tuple[str, str, str, Any]:
    method = draw(st.sampled_from(sorted(_REGISTRY)))
    table = draw(st.sampled_from(TABLES))
    # Any text: dots, spaces, newlines and other characters a quoted TOML key may hold.
    key = draw(st.one_of(st.from_regex(r"[a-z_]{1,12}", fullmatch=True), st.text(max_size=10)))
    if key in _known(table, method):
        key += "_x"
    return method, table, key, draw(_ANY_SCALAR)


@FAST
@given(_unknown_key())
def test_an_unknown_key_anywhere_is_a_one_line_error_naming_it(case):
    method, table, key, value = case
    data = _data(method)
    (data.setdefault(table, {}) if table else data)[key] = value
    with pytest.raises(ConfigError) as caught:
        resolve_config(data)
    message = str(caught.value)
    assert len(message.splitlines()) == 1, message
    assert "unknown key" in message
    assert message.startswith(f"{table}." if table else ""), message
    assert key in message or repr(key) in message, (key, message)


# -- anything at all -----------------------------------------------------------------------------
_TOML_VALUES = st.recursive(
    st.one_of(
        st.text(max_size=8), st.integers(-(2**70), 2**70), st.floats(), st.booleans(),
        st.sampled_from(["floral", "rotate", "none", "dense", "topk:0.1", "linear", "sgd"]),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=2)
    ),
    max_leaves=6,
)


@FAST
@given(st.lists(st.tuples(st.sampled_from(SETTINGS), _TOML_VALUES), min_size=1, max_size=3))
def test_any_values_give_a_valid_config_or_a_one_line_error_naming_a_key(changes):
    method = changes[0][0][0]
    data = _data(method)
    keys = []
    for (_, key, _), value in changes:
        if key.startswith("method.") and not _is_option_of(method, key):
            continue  # another method's option
        set_dotted(data, key, value)
        keys.append(key)
    try:
        config = resolve_config(data)
    except ConfigError as error:
        message = str(error)
        assert len(message.splitlines()) == 1, message
        assert any(key in message for key in keys), (keys, message)
        return
    for key in keys:  # whatever was accepted is finite
        node: Any = config
        for part in key.split("."):
            node = node[part] if isinstance(node, dict) else getattr(node, part)
        values = node if isinstance(node, list | tuple) else [node]
        assert all(math.isfinite(v) for v in values if isinstance(v, float)), (key, node)


def _is_option_of(method: str, key: str) -> bool:
    return key.removeprefix("method.") in {
        f.name for f in dataclasses.fields(_REGISTRY[method].cls.Options)
    }
