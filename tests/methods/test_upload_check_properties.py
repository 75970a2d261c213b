"""Property tests of `Method.check_upload`: a real client upload passes, and any single fault put
at a random place of it (NaN or infinity at any element of any tensor, a negative or integer
weight, a wrong shape or dtype, a missing or an extra tensor) is refused with a problem that
names the tensor.

Faults go anywhere, not at element 0, so a check that looks at the first element of each
tensor, or that trusts a weight's dtype, fails here.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from support.steps import upload_engine

from floral.methods import WEIGHT_SUFFIX, Method
from floral.methods.base import ServerState

# check_upload on ~20 small tensors takes well under a millisecond.
FAST = settings(
    max_examples=200,
    deadline=None,
    database=None,  # no .hypothesis/ examples database in the working tree
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

METHODS: dict[str, dict[str, Any]] = {
    "floral": {"name": "floral"},  # C = 2 adaptors: weights (2, 1, 1) and (2, 1)
    "fedavg": {"name": "fedavg"},
    "fedit": {"name": "fedit", "rank": 1},
    # Ranks per client: uploads judged by the method's own aggregation, values as the others.
    "hetlora": {"name": "hetlora", "rank": 1, "rank_tiers": [1]},
}
DEFAULT_CONTRACT = ("floral", "fedavg", "fedit")
NON_FINITE = (math.nan, math.inf, -math.inf)

Case = tuple[Method, ServerState, dict[str, torch.Tensor]]


@pytest.fixture(scope="module")
def real() -> dict[str, Case]:
    """Method name -> (method, server state, one real client's upload)."""
    cases = {}
    for name, method in METHODS.items():
        engine, _ = upload_engine(method)
        job = engine.local.job(0, engine.global_state, round_=1)
        upload = engine.method.client_step(engine.slots, job).upload
        state = ServerState(dict(engine.state.global_state))
        cases[name] = (engine.method, state, {n: t.clone() for n, t in upload.items()})
    return cases


def _named(problems: list[str], name: str) -> bool:
    return any(repr(name) in p for p in problems)


def _set_at(tensor: torch.Tensor, index: int, value: float) -> torch.Tensor:
    out = tensor.clone()
    out.view(-1)[index % out.numel()] = value
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_an_unmodified_real_upload_passes(real, method):
    check, state, upload = real[method]
    assert check.check_upload(state, upload) == []
    # Room for faults past element 0, in deltas and (floral's weights are per adaptor) weights.
    assert max(t.numel() for t in upload.values()) >= 16
    if method == "floral":
        assert any(t.numel() > 1 for n, t in upload.items() if n.endswith(WEIGHT_SUFFIX))


@FAST
@given(st.sampled_from(list(METHODS)), st.data())
def test_nan_or_infinity_at_any_element_of_any_tensor_is_refused(real, method, data):
    check, state, upload = real[method]
    name = data.draw(st.sampled_from(sorted(upload)), label="tensor")
    index = data.draw(st.integers(0, upload[name].numel() - 1), label="element")
    bad = {**upload, name: _set_at(upload[name], index, data.draw(st.sampled_from(NON_FINITE)))}
    problems = check.check_upload(state, bad)
    assert problems and _named(problems, name), problems
    assert any("NaN or infinite" in p for p in problems), problems


@FAST
@given(st.sampled_from(DEFAULT_CONTRACT), st.data())
def test_large_finite_values_anywhere_are_not_mistaken_for_overflow(real, method, data):
    """Sums of float32 values near 3e38 overflow; the values themselves are fine."""
    check, state, upload = real[method]
    deltas = sorted(n for n in upload if not n.endswith(WEIGHT_SUFFIX))
    bad = dict(upload)
    for name in data.draw(st.lists(st.sampled_from(deltas), min_size=1, max_size=4)):
        index = data.draw(st.integers(0, upload[name].numel() - 1))
        bad[name] = _set_at(bad[name], index, data.draw(st.sampled_from([3e38, -3e38, 1e30])))
    assert check.check_upload(state, bad) == []


@FAST
@given(st.sampled_from(list(METHODS)), st.data())
def test_a_negative_weight_anywhere_is_refused(real, method, data):
    check, state, upload = real[method]
    weights = sorted(n for n in upload if n.endswith(WEIGHT_SUFFIX))
    name = data.draw(st.sampled_from(weights), label="weight")
    index = data.draw(st.integers(0, upload[name].numel() - 1), label="element")
    value = data.draw(st.floats(max_value=-1e-30, min_value=-1e30), label="value")
    bad = {**upload, name: _set_at(upload[name], index, value)}
    problems = check.check_upload(state, bad)
    assert problems and _named(problems, name), problems
    assert any("negative" in p for p in problems), problems


INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.bool)


@FAST
@given(st.sampled_from(list(METHODS)), st.data())
def test_an_integer_weight_is_refused_whatever_its_values(real, method, data):
    check, state, upload = real[method]
    weights = sorted(n for n in upload if n.endswith(WEIGHT_SUFFIX))
    name = data.draw(st.sampled_from(weights), label="weight")
    dtype = data.draw(st.sampled_from(INTEGER_DTYPES), label="dtype")
    # Non-negative whole numbers, as a count of examples would be: only the dtype is wrong.
    values = data.draw(st.lists(st.integers(0, 100), min_size=upload[name].numel(),
                                max_size=upload[name].numel()))
    bad = {**upload, name: torch.tensor(values).reshape(upload[name].shape).to(dtype)}
    problems = check.check_upload(state, bad)
    assert problems and _named(problems, name), problems
    assert any("floating-point weight" in p for p in problems), problems


OTHER_DTYPES = (torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32)


@FAST
@given(st.sampled_from(DEFAULT_CONTRACT), st.data())
def test_a_delta_of_another_dtype_is_refused(real, method, data):
    check, state, upload = real[method]
    deltas = sorted(n for n in upload if not n.endswith(WEIGHT_SUFFIX))
    name = data.draw(st.sampled_from(deltas), label="tensor")
    dtype = data.draw(st.sampled_from(OTHER_DTYPES), label="dtype")
    bad = {**upload, name: upload[name].to(dtype)}
    problems = check.check_upload(state, bad)
    assert problems and _named(problems, name), problems


_SHAPES = st.lists(st.integers(1, 5), min_size=0, max_size=4).map(tuple)


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


@FAST
@given(st.sampled_from(DEFAULT_CONTRACT), st.data())
def test_a_tensor_of_the_wrong_shape_is_refused(real, method, data):
    check, state, upload = real[method]
    name = data.draw(st.sampled_from(sorted(upload)), label="tensor")
    shape = data.draw(_SHAPES, label="shape")
    target = tuple(state.global_state[name.removesuffix(WEIGHT_SUFFIX)].shape)
    if name.endswith(WEIGHT_SUFFIX):
        assume(not _broadcasts_to(shape, target))  # a weight may be any shape that broadcasts
    else:
        assume(shape != target)
    bad = {**upload, name: torch.ones(shape, dtype=upload[name].dtype)}
    problems = check.check_upload(state, bad)
    assert problems and _named(problems, name), problems
    assert any("shape" in p for p in problems), problems


@FAST
@given(st.sampled_from(DEFAULT_CONTRACT), st.data())
def test_missing_tensors_are_each_named(real, method, data):
    check, state, upload = real[method]
    gone = data.draw(st.sets(st.sampled_from(sorted(upload)), min_size=1), label="missing")
    bad = {n: t for n, t in upload.items() if n not in gone}
    problems = check.check_upload(state, bad)
    for name in gone:
        assert f"missing {name!r}" in problems, (name, problems)


_NAMES = st.one_of(
    st.text(min_size=1, max_size=12),
    st.text(min_size=1, max_size=12).map(lambda n: n + WEIGHT_SUFFIX),
    st.sampled_from(["floral_router.logits", "fc1.lora_A::weight::weight", "fc3.weight",
                     "fc3.weight::weight", "fc1.base.weight", "fc1.weight", "fc1.lora_A"]),
)


@FAST
@given(st.sampled_from(DEFAULT_CONTRACT), st.data())
def test_extra_tensors_are_each_named(real, method, data):
    check, state, upload = real[method]
    extra = data.draw(st.sets(_NAMES, min_size=1, max_size=3), label="extra")
    extra = {n for n in extra if n not in upload}
    assume(extra)
    shape = data.draw(_SHAPES, label="shape")
    bad = {**upload, **{n: torch.zeros(shape) for n in extra}}
    problems = check.check_upload(state, bad)
    for name in extra:
        assert f"unexpected {name!r}" in problems, (name, problems)
