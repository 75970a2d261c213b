"""Property tests of the typed config reader: whatever an experiment file or `--set` holds, the
result is a valid config or a one-line `ConfigError` that names the offending dotted key; and
every numeric setting is held to the range declared beside it (`RANGES`), so that a value out
of range, or a setting that could never take effect, stops `floral run` with one line before
anything is written.

Settings are enumerated from the dataclasses themselves (and every registered method's
options), so a new setting is covered without touching this file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from floral.cli import main
from floral.config import Range, check_ranges, declared_ranges, field_default, from_dict, set_dotted
from floral.data.registry import dataset_entry, dataset_names
from floral.errors import ConfigError
from floral.experiment import ExperimentConfig, resolve_config
from floral.methods import _REGISTRY, get_method
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


# -- ranges: every numeric setting declares the values it may take, and one checker holds them --
# A setting with a number in it: int, float, int | float, or a list of numbers.
def _is_numeric(hint: Any) -> bool:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is list:
        return args[0] in (int, float)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return bool({int, float} & set(args))
    return hint in (int, float)


def _dataclasses_with_settings() -> list[tuple[str, type]]:
    """(key prefix, dataclass) of every table of an experiment and every method's options."""
    found = [("", ExperimentConfig)]
    for f in dataclasses.fields(ExperimentConfig):
        hint = typing.get_type_hints(ExperimentConfig)[f.name]
        if dataclasses.is_dataclass(hint):
            found.append((f"{f.name}.", typing.cast(type, hint)))
    options = {entry.cls.Options for entry in _REGISTRY.values()}
    found += [("method.", cls) for cls in sorted(options, key=lambda c: c.__name__)]
    return found


@dataclasses.dataclass(frozen=True)
class Ranged:
    method: str  # a method that has the setting (the default one for other tables)
    key: str
    hint: Any
    range: Range
    default: Any


def _ranged_settings() -> list[Ranged]:
    """Every declared range of every table and every options class (under the first method
    that has it): enumerated from the declarations."""
    first_method = {}
    for name, entry in _REGISTRY.items():
        first_method.setdefault(entry.cls.Options, name)
    out = []
    for prefix, cls in _dataclasses_with_settings():
        hints, ranges = typing.get_type_hints(cls), declared_ranges(cls)
        method = first_method.get(cls, "floral")
        out += [Ranged(method, f"{prefix}{f.name}", hints[f.name], ranges[f.name],
                       field_default(f)) for f in dataclasses.fields(cls) if f.name in ranges]
    return out


RANGED = _ranged_settings()


def test_every_numeric_setting_declares_its_range():
    """A numeric field without a declared range (or a range naming no field) fails here."""
    missing, stale = [], []
    for prefix, cls in _dataclasses_with_settings():
        hints, ranges = typing.get_type_hints(cls), declared_ranges(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        missing += [f"{prefix}{n}" for n in names if _is_numeric(hints[n]) and n not in ranges]
        stale += [f"{cls.__name__}.{n}" for n in ranges if n not in names]
    assert not missing, f"numeric settings without a range: {sorted(missing)}"
    assert not stale, f"ranges of no setting: {sorted(stale)}"
    keys = {s.key for s in RANGED}
    assert {"seed", "train.momentum", "train.server_lr", "train.betas", "train.eval_batch_size",
            "engine.min_fit_clients", "task.num_clients", "model.hidden", "method.rank",
            "method.seed_round", "method.warmup_rounds", "method.fusion_init"} <= keys


def test_every_default_and_preset_lies_in_its_range():
    check_ranges(ExperimentConfig(), "")
    for name, entry in _REGISTRY.items():
        check_ranges(get_method(name).options, "method")
        check_ranges(entry.cls.Options(), "method")


def _outside_ints(r: Range, interval: str = "") -> st.SearchStrategy[int]:
    low, high, low_open, high_open = r.bounds() if not interval else Range(interval).bounds()
    parts = []
    if math.isfinite(low):
        top = math.floor(low) if low_open else math.ceil(low) - 1
        parts.append(st.integers(top - 2**63, top))
    if math.isfinite(high):
        bottom = math.ceil(high) if high_open else math.floor(high) + 1
        parts.append(st.integers(bottom, bottom + 2**63))
    return st.one_of(parts).filter(lambda v: not (r.zero and v == 0))


def _outside_floats(r: Range, interval: str = "") -> st.SearchStrategy[float]:
    low, high, low_open, high_open = Range(interval or r.interval).bounds()
    finite = {"allow_nan": False, "allow_infinity": False}
    parts = []
    if math.isfinite(low):
        parts.append(st.floats(max_value=low, **finite).filter(
            lambda v: v < low or (low_open and v == low)))
    if math.isfinite(high):
        parts.append(st.floats(min_value=high, **finite).filter(
            lambda v: v > high or (high_open and v == high)))
    return st.one_of(parts).filter(lambda v: not (r.zero and v == 0))


def _outside(s: Ranged) -> st.SearchStrategy[Any]:
    """Values of the setting's type that its range refuses."""
    r, hint = s.range, s.hint
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        inside = list(s.default)
        wrong = []
        if math.isfinite(r.bounds()[0]) or math.isfinite(r.bounds()[1]):
            bad = _outside_ints(r) if item is int else _outside_floats(r)
            position = st.integers(0, max(0, len(inside) - 1))
            keep = 1 if r.length else 0  # a fixed length: the bad item replaces one
            wrong.append(st.tuples(bad, position).map(
                lambda pair: [*inside[: pair[1]], pair[0], *inside[pair[1] + keep:]]))
        if r.length:
            filler = inside[0]
            wrong.append(st.integers(0, 5).filter(lambda n: n != r.length).map(
                lambda n: [filler] * n))
        return st.one_of(wrong)
    if r.fraction:  # int | float: an int outside the interval, a float outside the fraction's
        return st.one_of(_outside_ints(r), _outside_floats(r, r.fraction))
    return _outside_ints(r) if hint is int else _outside_floats(r)


def _dataset_reading(key: str) -> str:
    """A dataset whose `[task]` options include task `key` (the base's when it is common)."""
    option = key.removeprefix("task.")
    if option in dataset_entry(BASE["task"]["dataset"]).options:
        return BASE["task"]["dataset"]
    return next(name for name in dataset_names() if option in dataset_entry(name).options)


@pytest.fixture(scope="module")
def experiment_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ranges") / "base.toml"
    path.write_text(tomli_w.dumps(BASE))
    return path


def _toml(value: Any) -> str:
    return tomli_w.dumps({"v": value}).partition("=")[2].strip()


def _run_cli(path: Path, out: Path, settings: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    argv = ["run", str(path), "--quiet", "--out", str(out)]
    with contextlib.redirect_stderr(err):
        code = main([*argv, *(a for s in settings for a in ("--set", s))])
    return code, err.getvalue()


def _assert_refused(code: int, err: str, key: str, out: Path) -> None:
    assert code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, err  # exactly one line
    assert err.startswith(f"floral: error: {key}: "), err
    assert not out.exists()  # nothing written, not even the folder


@pytest.mark.parametrize("setting", RANGED, ids=[f"{s.method}:{s.key}" for s in RANGED])
@settings(max_examples=4, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_a_value_out_of_range_stops_floral_run_with_one_line_and_nothing_written(
    setting, data, experiment_file, tmp_path
):
    value = data.draw(_outside(setting), label=setting.key)
    overrides = [f"method.name={setting.method}"]
    if setting.key.startswith("task."):
        overrides.append(f"task.dataset={_dataset_reading(setting.key)}")
    overrides.append(f"{setting.key}={_toml(value)}")
    out = tmp_path / "out"
    code, err = _run_cli(experiment_file, out, overrides)
    _assert_refused(code, err, setting.key, out)


@settings(max_examples=300, deadline=None, database=None)
@given(st.sampled_from(RANGED), st.data())
def test_values_on_either_side_of_a_range_are_told_apart(setting, data):
    value = data.draw(_outside(setting))
    with pytest.raises(ConfigError) as caught:
        setting.range.check(setting.key, value)
    _assert_names(caught.value, setting.key)
    setting.range.check(setting.key, setting.default)  # the default is inside


@pytest.mark.parametrize(("settings", "line"), [
    # The issue's cases: each stopped after work began, or ran to a ruined model.
    (["train.momentum=-0.5"], "train.momentum: must be in [0, 1), got -0.5"),
    (["train.weight_decay=-0.1"], "train.weight_decay: must be >= 0, got -0.1"),
    (["train.eval_batch_size=0"], "train.eval_batch_size: must be at least 1, got 0"),
    (["train.server_lr=-1.0"], "train.server_lr: must be > 0, got -1.0"),
    (["train.optimizer=adamw", "train.betas=[0.9, 1.0]"],
     "train.betas: two numbers in [0, 1), got [0.9, 1.0]"),
    (["train.server_optimizer=adam", "train.server_betas=[1.0, 0.999]"],
     "train.server_betas: two numbers in [0, 1), got [1.0, 0.999]"),
    (["method.name=floral-seeded", "method.seed_round=3"],
     "method.seed_round: 3 is after the last round (train.rounds = 2): the routed adaptors "
     "would never be seeded"),
    # Options that could never take effect.
    (["method.name=floral-em", "method.warmup_rank=0.1", "method.warmup_rounds=2"],
     "method.warmup_rounds: 2 must end before the last round (train.rounds = 2): the model "
     "restarts when the warm-up ends"),
    (["method.name=floral-em", "method.warmup_rounds=1"],
     "method.warmup_rounds: 1 takes effect only with a rank warm-up (method.warmup_rank > 0)"),
    (["train.warmup_rounds=2"], "train.warmup_rounds: must be in [0, train.rounds), got 2"),
    (["train.optimizer=adamw", "train.momentum=0.9"],
     "train.momentum: 0.9 takes effect only with train.optimizer = 'sgd' (this run's is 'adamw')"),
    (["train.eps=1e-6"],
     "train.eps: 1e-06 takes effect only with train.optimizer = 'adamw' (this run's is 'sgd')"),
    (["train.server_momentum=0.9", "train.server_optimizer=adam"],
     "train.server_momentum: 0.9 takes effect only with train.server_optimizer = 'sgd' (this "
     "run's is 'adam')"),
    (["train.server_betas=[0.5, 0.9]"],
     "train.server_betas: [0.5, 0.9] takes effect only with train.server_optimizer = 'adam' "
     "(this run's is 'sgd')"),
    (["train.dp_delta=1e-6"],
     "train.dp_delta: 1e-06 takes effect only with differential privacy (train.dp_clip > 0)"),
    (["method.name=hetlora", "method.ranks=[1, 2]"],
     "method.ranks: 2 ranks for 4 clients; give one per client or use method.rank_tiers"),
    (["method.name=flora", "method.layer_types=[\"norm\"]"],
     "method.layer_types: flora merges only linear, conv2d layers, not norm"),
    (["method.name=fdlora", "method.bias=true"],
     "method.bias: fdlora has no adaptive bias (its two LoRAs are factors)"),
])
def test_each_setting_that_cannot_work_is_one_line_before_any_work(
    experiment_file, tmp_path, settings, line
):
    out = tmp_path / "out"
    code, err = _run_cli(experiment_file, out, settings)
    _assert_refused(code, err, line.partition(":")[0], out)
    assert err == f"floral: error: {line}\n"


@pytest.mark.parametrize("settings", [
    ["method.name=floral-seeded", "method.seed_round=2"],  # seeded at the last round: saved
    ["engine.eval_every=50"],  # the last round is always evaluated
    # The final state is always saved; a resumed run with more rounds may reach the setting.
    ["engine.checkpoint_every=50"],
    ["method.name=floral-em", "method.warmup_rank=0.1", "method.warmup_rounds=1"],
    ["train.optimizer=adamw", "train.betas=[0.5, 0.9]", "train.eps=1e-6"],
    ["train.server_optimizer=adam", "train.server_betas=[0.5, 0.9]", "train.server_eps=1e-6"],
    ["method.name=fedavg", "train.dp_clip=1.0", "train.dp_delta=1e-6", "train.dp_mode=local"],
])
def test_settings_that_take_effect_are_accepted(settings):
    resolve_config(_data("floral"), settings)
