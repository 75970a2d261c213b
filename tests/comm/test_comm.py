"""Codecs against computations done here by hand: kept entries, error bounds, byte counts."""

from __future__ import annotations

import math

import pytest
import torch

from floral.comm import Channel, build_codec
from floral.comm.quant import pack_codes, unpack_codes
from floral.errors import ConfigError
from floral.methods import WEIGHT_SUFFIX


def _message(seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors of very different scales (a global threshold must favour the large ones)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "fc1.lora_A": torch.randn(1, 4, 30, generator=g),
        "fc1.lora_B": 0.01 * torch.randn(1, 4, 12, generator=g),
        "fc1.base.weight": 3.0 * torch.randn(12, 30, generator=g),
        "fc1.base.bias": torch.randn(12, generator=g),
        "fc1.lora_A" + WEIGHT_SUFFIX: torch.tensor(70000.0),  # beyond float16's range
    }


def _lossy(message: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in message.items() if not k.endswith(WEIGHT_SUFFIX)}


@pytest.mark.parametrize("density", [0.01, 0.1, 0.37, 1.0])
def test_topk_keeps_exactly_k_largest_entries_under_one_threshold(density):
    message = _message()
    decoded, _ = Channel(build_codec(f"topk:{density}")).send(message)
    lossy = _lossy(message)
    values = torch.cat([t.reshape(-1) for t in lossy.values()])
    k = max(1, round(density * values.numel()))
    kept = torch.cat([decoded[n].reshape(-1) for n in lossy])
    assert int((kept != 0).sum()) == k
    # The same k positions as a full sort of the magnitudes of the whole message.
    largest = set(values.abs().argsort(descending=True)[:k].tolist())
    assert set(torch.nonzero(kept).flatten().tolist()) == largest
    assert torch.equal(kept[kept != 0], values[kept != 0])  # kept values are exact
    weight = "fc1.lora_A" + WEIGHT_SUFFIX
    assert decoded[weight].dtype == torch.float32 and decoded[weight] == 70000.0


def test_topk_threshold_is_global_not_per_tensor():
    decoded, _ = Channel(build_codec("topk:0.2")).send(_message())
    # The tiny lora_B loses everything to the large base weight: no per-tensor quota.
    assert torch.count_nonzero(decoded["fc1.lora_B"]) == 0
    assert torch.count_nonzero(decoded["fc1.base.weight"]) > 0


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
def test_quantize_dequantize_error_within_half_a_step_per_channel(bits):
    message = _message(1)
    decoded, _ = Channel(build_codec(f"quant:{bits}")).send(message)
    levels = 2**bits - 1
    rows_of = {  # channels by hand: (adaptor, rank) rows of factors, output rows, whole vector
        "fc1.lora_A": lambda t: t.reshape(4, 30),
        "fc1.lora_B": lambda t: t.reshape(4, 12),
        "fc1.base.weight": lambda t: t,
        "fc1.base.bias": lambda t: t.reshape(1, 12),
    }
    for name, rows in rows_of.items():
        original, restored = rows(message[name]), rows(decoded[name])
        step = (original.amax(1) - original.amin(1)) / levels
        error = (original - restored).abs().amax(1)
        assert torch.all(error <= step / 2 * (1 + 1e-5) + 1e-7), (name, error, step)
    assert decoded["fc1.lora_A" + WEIGHT_SUFFIX] == 70000.0


def test_quantize_keeps_constant_channels_exact():
    tensor = torch.tensor([[1.5, 1.5, 1.5, 1.5], [0.0, 3.0, 1.0, 2.0]])
    decoded, _ = Channel(build_codec("quant:2")).send({"w": tensor})
    torch.testing.assert_close(decoded["w"], tensor)  # 0..3 is exactly the 2-bit grid


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_code_packing_round_trips(bits):
    codes = torch.randint(0, 2**bits, (37,), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.numel() == math.ceil(37 * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, 37), codes)


def _expected_bytes(spec: str, message: dict[str, torch.Tensor]) -> int:
    """The payload size from first principles: what each codec must send per number."""
    lossy = _lossy(message)
    weights = 4 * (len(message) - len(lossy))
    sizes = {n: t.numel() for n, t in lossy.items()}
    shapes = sum(4 * t.dim() for t in lossy.values())  # int32 shape per encoded tensor
    total = sum(sizes.values())
    if spec == "dense":
        return 4 * total + weights
    if spec in ("fp16", "bf16"):
        return 2 * total + weights
    if spec.startswith("topk:"):
        k = round(float(spec[5:]) * total)
        return 8 * k + shapes + weights  # float32 value + int32 index per kept number
    bits = int(spec[6:])
    channels = {"fc1.lora_A": 4, "fc1.lora_B": 4, "fc1.base.weight": 12, "fc1.base.bias": 1}
    codes = sum(math.ceil(n * bits / 8) for n in sizes.values())
    return codes + 8 * sum(channels.values()) + shapes + weights


@pytest.mark.parametrize(
    "spec", ["dense", "fp16", "bf16", "topk:0.1", "topk:0.5", "quant:8", "quant:4", "quant:2"]
)
def test_bytes_counted_equal_the_payload_size_computed_by_hand(spec):
    message = _message(2)
    _, counted = Channel(build_codec(spec)).send(message)
    assert counted == _expected_bytes(spec, message)


def test_half_precision_round_trip_error():
    message = _message(3)
    for spec, mantissa in (("fp16", 10), ("bf16", 7)):
        decoded, _ = Channel(build_codec(spec)).send(message)
        for name, tensor in _lossy(message).items():
            bound = tensor.abs() * 2.0 ** -(mantissa + 1) + 1e-7
            assert torch.all((decoded[name] - tensor).abs() <= bound)
            assert decoded[name].dtype == torch.float32


def test_compact_spec_is_the_same_codec():
    assert build_codec("topk0.25").spec == build_codec("topk:0.25").spec == "topk:0.25"
    assert build_codec("quant4").spec == "quant:4"


@pytest.mark.parametrize(
    "spec, words",
    [
        ("topk:0", "(0, 1]"),
        ("topk:x", "(0, 1]"),
        ("quant:3", "bit width"),
        ("fp16:2", "no argument"),
        ("gzip", "unknown codec"),
    ],
)
def test_bad_specs_are_one_line_errors_naming_the_key(spec, words):
    with pytest.raises(ConfigError) as error:
        build_codec(spec, "comm.upload")
    message = str(error.value)
    assert message.startswith("comm.upload: ") and words in message and "\n" not in message
