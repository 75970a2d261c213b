"""The check of clients' stacked uploads (`Method.check_upload_batch`) against the check of each
upload alone (`Method.check_upload`), the independent computation.

The server checks a batch of stacked uploads at once and, where that check is not certain that
every row is fine, checks each row alone. So the batch check must never pass a batch in which
`check_upload` refuses any row: every verdict below is compared, row by row, with
`check_upload` on that row. Faults go at any row and element of real stacked uploads, as in
test_upload_check_properties.py for one upload.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.steps import upload_engine

from floral.methods import WEIGHT_SUFFIX, Method
from floral.methods.base import ServerState, UploadBatch

FAST = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

METHODS: dict[str, dict[str, Any]] = {
    "floral": {"name": "floral"},  # weights per adaptor: (K, 2, 1, 1) and (K, 2, 1)
    "fedavg": {"name": "fedavg"},  # one weight per client, shared by its tensors
    "fedit": {"name": "fedit", "rank": 1},
}

Case = tuple[Method, ServerState, UploadBatch]


@pytest.fixture(scope="module")
def real() -> dict[str, Case]:
    """Method name -> (method, server state, the stacked uploads of a real batched round)."""
    cases = {}
    for name, method in METHODS.items():
        engine, task = upload_engine(method)
        private = {k: engine.local.private_state(k) for k in range(len(task.clients))}
        updates = engine.worker.train(1, engine.global_state, private)
        batch = updates[0].batch
        assert batch is not None and len(batch.clients) == 4  # the 4 clients trained together
        cases[name] = (engine.method, ServerState(dict(engine.global_state)), batch)
    return cases


def _verdicts(method: Method, state: ServerState, tensors: dict[str, torch.Tensor],
              clients: tuple[int, ...]) -> tuple[list[list[str]], list[list[str]], bool]:
    """(the server's problems per row: none where the batch passes, else the row's own check;
    `check_upload` of each row alone; whether the batch passed)."""
    batch = UploadBatch(clients, tensors)
    passed = method.check_upload_batch(state, batch)
    alone = [method.check_upload(state, row) for row in batch.rows]
    return ([[] for _ in alone] if passed else alone), alone, passed


def _materialized(batch: UploadBatch) -> dict[str, torch.Tensor]:
    """The stacked tensors as separate copies (a weight shared by all rows included)."""
    return {name: value.clone() for name, value in batch.tensors.items()}


@pytest.mark.parametrize("method", list(METHODS))
def test_real_stacked_uploads_pass_at_once(real, method):
    check, state, batch = real[method]
    server, alone, passed = _verdicts(check, state, dict(batch.tensors), batch.clients)
    assert passed and server == alone == [[]] * 4


def _fault(data: st.DataObject, batch: UploadBatch,
           state: ServerState) -> tuple[dict[str, torch.Tensor], list[int]]:
    """A copy of the stacked uploads with one fault, and the rows `check_upload` refuses."""
    tensors = _materialized(batch)
    every = list(range(len(batch.clients)))
    kind = data.draw(st.sampled_from(["value", "negative", "overflow", "integer", "dtype",
                                      "shape", "missing", "extra"]), label="fault")
    names = sorted(tensors)
    weights = [n for n in names if n.endswith(WEIGHT_SUFFIX)]
    deltas = [n for n in names if n not in weights]
    row = data.draw(st.integers(0, len(every) - 1), label="row")
    if kind in ("value", "negative", "overflow"):
        name = data.draw(st.sampled_from(names if kind == "value" else
                                         weights if kind == "negative" else deltas))
        values = {"value": st.sampled_from([math.nan, math.inf, -math.inf]),
                  "negative": st.floats(min_value=-1e30, max_value=-1e-30),
                  "overflow": st.sampled_from([3e38, -3e38])}[kind]
        flat = tensors[name][row].view(-1)
        for _ in range(2 if kind == "overflow" else 1):  # two near 3e38 overflow a sum
            flat[data.draw(st.integers(0, flat.numel() - 1))] = data.draw(values)
        return tensors, [] if kind == "overflow" else [row]  # large finite values are fine
    if kind == "integer":
        name = data.draw(st.sampled_from(weights))
        tensors[name] = tensors[name].round().to(torch.int64)
    elif kind == "dtype":
        name = data.draw(st.sampled_from(deltas))
        tensors[name] = tensors[name].to(torch.float64)
    elif kind == "shape":  # every row: a delta one column wider, a weight of too many axes
        name = data.draw(st.sampled_from(names))
        value = tensors[name]
        target = state.global_state[name.removesuffix(WEIGHT_SUFFIX)]
        tensors[name] = (value.reshape(len(every), *(1,) * (target.dim() + 1))
                         if name in weights and value[0].numel() == 1
                         else torch.cat([value, value[..., :1]], dim=-1))
    elif kind == "missing":
        del tensors[data.draw(st.sampled_from(names))]
    else:
        tensors["extra" + data.draw(st.sampled_from(["", WEIGHT_SUFFIX]))] = tensors[deltas[0]]
    return tensors, every


@FAST
@given(st.sampled_from(list(METHODS)), st.data())
def test_the_batch_check_refuses_exactly_the_rows_each_check_refuses(real, method, data):
    check, state, batch = real[method]
    tensors, refused = _fault(data, batch, state)
    server, alone, passed = _verdicts(check, state, tensors, batch.clients)
    assert server == alone  # the same rows refused, in the same words
    assert [i for i, problems in enumerate(alone) if problems] == refused  # the faults are real
    assert not (passed and refused)
