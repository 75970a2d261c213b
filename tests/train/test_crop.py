"""A causal-LM batch loses its trailing padding columns before the model sees it, and nothing
else changes: the loss, its gradient, a local training run and the test sums are those of the
uncropped batch (to float rounding: the products have other shapes)."""

from __future__ import annotations

import pytest
import torch

from floral.train.loop import train_epochs
from floral.train.objective import IGNORE_INDEX, crop_padding, get_objective, next_token_loss

pytest.importorskip("transformers")

from floral.llm.model import build_causal_lm  # noqa: E402

VOCAB, WIDTH = 40, 24


def padded_batch(lengths: list[int], prompt: int = 3, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Rows of `lengths` tokens padded on the right to WIDTH, as the task builders pad them:
    the first `prompt - 1` targets of a row and its padding have no loss."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(len(lengths), WIDTH, dtype=torch.long)
    y = torch.full((len(lengths), WIDTH), IGNORE_INDEX, dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens = torch.randint(1, VOCAB, (n + 1,), generator=g)
        x[i, :n], y[i, :n] = tokens[:-1], tokens[1:]
        y[i, : prompt - 1] = IGNORE_INDEX
    return x, y


def tiny_lm(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_causal_lm("tiny-llama", VOCAB)


def test_crop_keeps_every_column_with_a_target() -> None:
    x, y = padded_batch([5, 11, 7])
    xc, yc = crop_padding(x, y)
    assert xc.shape == yc.shape == (3, 11)
    assert torch.equal(xc, x[:, :11]) and torch.equal(yc, y[:, :11])
    assert bool((y[:, 11:] == IGNORE_INDEX).all())
    # No target anywhere: one column stays, so the model still gets a batch.
    nothing = torch.full_like(y, IGNORE_INDEX)
    assert crop_padding(x, nothing)[0].shape == (3, 1)


def test_crop_is_only_for_causal_lms() -> None:
    x, y = torch.randn(4, WIDTH), torch.randint(0, 3, (4,))
    for kind in ("classification", "regression"):
        xc, yc = get_objective(kind).crop(x, y)
        assert xc is x and yc is y
    assert get_objective("causal-lm").crop is crop_padding


def test_cropped_loss_and_gradient_match_the_full_batch() -> None:
    model = tiny_lm()
    x, y = padded_batch([6, 9, 4, 8])
    xc, yc = crop_padding(x, y)
    assert xc.shape[1] < WIDTH
    grads = []
    for xb, yb in ((x, y), (xc, yc)):
        model.zero_grad()
        loss = next_token_loss(model(xb), yb)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (full, full_grads), (cropped, cropped_grads) = grads
    torch.testing.assert_close(cropped, full, rtol=1e-6, atol=1e-6)
    for a, b in zip(cropped_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_training_with_crop_ends_where_training_without_it_ends() -> None:
    x, y = padded_batch([3 + (i * 5) % 12 for i in range(16)], seed=1)
    ends, widths = [], []
    for crop in (None, crop_padding):
        model = tiny_lm(seed=2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        kwargs = {} if crop is None else {"crop": crop}

        def forward(xb: torch.Tensor, model: torch.nn.Module = model) -> torch.Tensor:
            widths.append(xb.shape[1])
            return model(xb)

        loss = train_epochs(model, optimizer, x, y, next_token_loss, batch_size=4, epochs=2,
                            generator=torch.Generator().manual_seed(3), forward=forward,
                            **kwargs)
        ends.append((loss, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (loss_full, full), (loss_cropped, cropped) = ends
    assert widths[:8] == [WIDTH] * 8 and max(widths[8:]) < WIDTH  # the crop was applied
    assert loss_cropped == pytest.approx(loss_full, rel=1e-5)
    torch.testing.assert_close(cropped, full, rtol=1e-4, atol=1e-5)


def test_test_sums_with_crop_match_a_per_row_computation() -> None:
    model = tiny_lm(seed=4).eval()
    x, y = padded_batch([5, 12, 3, 9, 7], seed=5)
    result = get_objective("causal-lm").evaluate(model, x, y, batch_size=2)
    # Independently: each row alone, cut to its own length, summed by hand.
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        for xi, yi in zip(x, y, strict=True):
            n = int((yi != IGNORE_INDEX).nonzero()[-1]) + 1
            logits = model(xi[None, :n])[0]
            kept = yi[:n] != IGNORE_INDEX
            loss_sum += float(torch.nn.functional.cross_entropy(
                logits[kept], yi[:n][kept], reduction="sum"))
            count += int(kept.sum())
    assert result.count == count
    assert result.loss_sum == pytest.approx(loss_sum, rel=1e-5)
