"""floral.adapters: the fused mixture against per-adaptor loops written here from the formulas."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from floral.adapters import (
    AdapterSpec,
    RouterSpec,
    adaptor_parameter_names,
    attach,
    merge,
    mixture_weights,
    precondition_,
    resolve_rank,
    router_parameter_names,
)
from floral.errors import ConfigError

NUM_ADAPTORS, RANK, ALPHA, TEMPERATURE = 3, 2, 0.7, 1.5
TOLERANCE = {"rtol": 1e-9, "atol": 1e-10}


def make_case(kind: str) -> tuple[nn.Module, torch.Tensor, AdapterSpec]:
    """A one-layer model of the given kind, an input for it, and the spec that adapts it."""
    spec = dict(
        num_adaptors=NUM_ADAPTORS,
        rank=RANK,
        alpha=ALPHA,
        router=RouterSpec(noise=0.0, temperature=TEMPERATURE),
    )
    if kind.startswith("linear"):
        layer, x, types = nn.Linear(6, 5, bias=kind == "linear"), torch.randn(4, 3, 6), ("linear",)
    elif kind.startswith("conv2d"):
        layer = nn.Conv2d(3, 4, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
        if kind.endswith("reflect"):
            layer = nn.Conv2d(3, 4, (2, 4), padding="same", padding_mode="reflect")
        x, types = torch.randn(2, 3, 9, 11), ("conv2d",)
        spec["conv_form"] = "kxk-1x1" if "kxk" in kind else "separable"
    elif kind == "embedding":
        layer, types = nn.Embedding(10, 6, padding_idx=0), ("embedding",)
        x = torch.tensor([[0, 3, 9, 3], [1, 2, 0, 7], [5, 5, 6, 8]])
    elif kind == "batchnorm":
        layer, x, types = nn.BatchNorm2d(4), torch.randn(5, 4, 3, 3), ("norm",)
    elif kind == "batchnorm1d":
        layer, x, types = nn.BatchNorm1d(4, affine=False), torch.randn(6, 4), ("norm",)
    elif kind == "layernorm":
        layer, x, types = nn.LayerNorm((4, 5)), torch.randn(3, 2, 4, 5), ("norm",)
    elif kind == "groupnorm":
        layer, x, types = nn.GroupNorm(2, 6), torch.randn(3, 6, 4, 4), ("norm",)
    else:
        raise ValueError(kind)
    model = nn.Sequential(layer).double()
    x = x.double() if x.is_floating_point() else x
    return model, x, AdapterSpec(layer_types=types, **spec)


KINDS = [
    "linear",
    "linear-nobias",
    "conv2d-separable",
    "conv2d-kxk-1x1",
    "conv2d-separable-reflect",
    "embedding",
    "batchnorm",
    "batchnorm1d",
    "layernorm",
    "groupnorm",
]


def randomize_(model: nn.Module) -> None:
    """Random nonzero adaptors, router logits and norm statistics."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in adaptor_parameter_names(model) or "router" in name:
                parameter.normal_(0.0, 0.5)
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_()
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)


def normalized(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x-hat of a norm layer, from the textbook definitions."""
    if isinstance(norm, nn.LayerNorm):
        dims = tuple(range(-len(norm.normalized_shape), 0))
        mean, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + norm.eps)
    if isinstance(norm, nn.GroupNorm):
        grouped = x.reshape(x.shape[0], norm.num_groups, -1)
        mean = grouped.mean(-1, keepdim=True)
        var = grouped.var(-1, unbiased=False, keepdim=True)
        return ((grouped - mean) / torch.sqrt(var + norm.eps)).reshape(x.shape)
    stats_shape = [1, -1] + [1] * (x.dim() - 2)
    dims = [d for d in range(x.dim()) if d != 1]
    if norm.training:
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
    else:
        mean, var = norm.running_mean, norm.running_var
    return (x - mean.view(stats_shape)) / torch.sqrt(var.view(stats_shape) + norm.eps)


def naive_mixture(layer: nn.Module, x: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """base(x) + alpha * sum_c pi_c * (adaptor c's own output), one adaptor at a time."""
    base = layer.base
    if hasattr(layer, "norm_weight_delta"):
        x_hat = normalized(base, x)
        channel_shape = [-1] + [1] * (x.dim() - 2) if not isinstance(base, nn.LayerNorm) else [-1]
        weight = torch.ones(1, dtype=x.dtype) if base.weight is None else base.weight
        bias = torch.zeros(1, dtype=x.dtype) if base.bias is None else base.bias

        def affine(gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
            if isinstance(base, nn.LayerNorm):
                return x_hat * gamma + beta
            return x_hat * gamma.view(channel_shape) + beta.view(channel_shape)

        out = affine(weight, bias)
        for c in range(len(pi)):
            delta = affine(layer.norm_weight_delta[c], layer.norm_bias_delta[c])
            out = out + ALPHA * pi[c] * delta
        return out
    out = base(x)
    for c in range(len(pi)):
        a_c, b_c = layer.lora_A[c], layer.lora_B[c]  # A_c (r, ...), B_c^T (r, ...)
        if isinstance(base, nn.Linear):
            delta = F.linear(F.linear(x, a_c), b_c.t())
        elif isinstance(base, nn.Embedding):
            rows = a_c.t()[x]
            # The padding token's column of A is frozen (zero), so it gets no gradient.
            rows = torch.where((x == base.padding_idx)[..., None], rows.detach(), rows)
            delta = rows @ b_c
        else:
            kernel = adaptor_kernel(a_c, b_c)
            delta = reference_conv(base, x, kernel)
        bias_c = layer.lora_bias[c] if getattr(layer, "lora_bias", None) is not None else 0.0
        if isinstance(base, nn.Conv2d) and torch.is_tensor(bias_c):
            bias_c = bias_c.view(-1, 1, 1)
        out = out + ALPHA * pi[c] * (delta + bias_c)
    return out


def adaptor_kernel(a_c: torch.Tensor, b_c: torch.Tensor) -> torch.Tensor:
    """One adaptor's full conv kernel (out, in, kh, kw), summing its r rank-one terms."""
    kernel = 0.0
    for j in range(a_c.shape[0]):
        a_j, b_j = a_c[j], b_c[j]  # (in, 1, kw) & (out, kh, 1), or (in, kh, kw) & (out, 1, 1)
        if a_j.shape[1] == 1:
            kernel = kernel + b_j[:, None, :, :] * a_j[None, :, :, :]
        else:
            kernel = kernel + b_j[:, None, :, :] * a_j[None]
    return kernel


def reference_conv(conv: nn.Conv2d, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """The base conv's geometry (stride, padding, padding mode) with another kernel."""
    plain = copy.deepcopy(conv)
    plain.bias = None
    return plain._conv_forward(x, kernel, None)


def softmax_pi(logits: torch.Tensor) -> torch.Tensor:
    return torch.exp(logits / TEMPERATURE) / torch.exp(logits / TEMPERATURE).sum(-1, keepdim=True)


# --- the mixture --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_fused_mixture_equals_per_adaptor_loop_with_gradients(kind: str) -> None:
    torch.manual_seed(0)
    model, x, spec = make_case(kind)
    attach(model, spec)
    randomize_(model)
    layer, router = model[0], model.floral_router
    inputs = [x.requires_grad_()] if x.is_floating_point() else []
    leaves = inputs + list(layer.adaptor_parameters().values()) + [router.logits]

    fused = model(x)
    expected = naive_mixture(layer, x, softmax_pi(router.logits))
    torch.testing.assert_close(fused, expected, **TOLERANCE)

    weights = torch.randn_like(fused)
    grads = torch.autograd.grad((fused * weights).sum(), leaves)
    expected_grads = torch.autograd.grad((expected * weights).sum(), leaves)
    assert all(g.abs().sum() > 0 for g in grads)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, **TOLERANCE)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("training", [True, False])
def test_attach_leaves_outputs_unchanged_at_init(kind: str, training: bool) -> None:
    torch.manual_seed(1)
    model, x, spec = make_case(kind)
    spec.router = RouterSpec(noise=1.0)
    plain = copy.deepcopy(model).train(training)
    attach(model, spec).train(training)
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    buffers = zip(model[0].base.named_buffers(), plain[0].buffers(), strict=True)
    for (name, buffer), plain_buffer in buffers:
        torch.testing.assert_close(buffer, plain_buffer, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_matches_adapted_model_in_eval(kind: str) -> None:
    torch.manual_seed(2)
    model, x, spec = make_case(kind)
    spec.router = RouterSpec(noise=1.0, temperature=TEMPERATURE)
    attach(model, spec)
    randomize_(model)
    model.eval()
    merged = merge(model)
    assert type(merged[0]) is type(model[0].base)
    assert not hasattr(merged, "floral_router") and len(merged) == 1
    assert not merged._forward_pre_hooks
    assert all(p is not None for p in (merged[0].weight, getattr(merged[0], "bias", 0)))
    assert getattr(merged[0], "affine", True) and getattr(merged[0], "elementwise_affine", True)
    torch.testing.assert_close(merged(x), model(x), **TOLERANCE)

    one_hot = torch.eye(NUM_ADAPTORS, dtype=torch.float64)[1]
    model.floral_router.fix(one_hot)
    torch.testing.assert_close(merge(model, torch.eye(3)[1])(x), model(x), **TOLERANCE)


def test_batchnorm_running_stats_update_once_per_forward() -> None:
    torch.manual_seed(3)
    model, x, spec = make_case("batchnorm")
    plain = copy.deepcopy(model)
    attach(model, spec)
    randomize_(model)
    with torch.no_grad():
        plain[0].running_mean.copy_(model[0].base.running_mean)
        plain[0].running_var.copy_(model[0].base.running_var)
    model(x)
    plain(x)
    torch.testing.assert_close(model[0].base.running_mean, plain[0].running_mean, **TOLERANCE)
    torch.testing.assert_close(model[0].base.running_var, plain[0].running_var, **TOLERANCE)
    assert int(model[0].base.num_batches_tracked) == 1


def test_conv_separable_merged_kernel_is_the_composition_of_the_two_convs() -> None:
    torch.manual_seed(4)
    model, x, spec = make_case("conv2d-separable")
    attach(model, spec)
    randomize_(model)
    layer = model[0]
    pi = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    expected = layer.base.weight.detach().clone()
    for c in range(NUM_ADAPTORS):
        for j in range(RANK):
            for o in range(4):
                for i in range(3):
                    column = layer.lora_B[c, j, o, :, 0]  # (kh,)
                    row = layer.lora_A[c, j, i, 0, :]  # (kw,)
                    expected[o, i] += ALPHA * pi[c] * torch.outer(column, row).detach()
    torch.testing.assert_close(merge(model, pi)[0].weight, expected, **TOLERANCE)


# --- AdaptedLinear's merged and factored forms ----------------------------------------------

# (batch shape, in, out, rank, merged by the cost rule rows * (in + out) > in * out)
LINEAR_SHAPES = [
    ((1,), 7, 5, 2, False),  # batch 1
    ((3,), 24, 16, 1, False),
    ((2, 3), 24, 16, 2, False),  # leading axes: rows = 6
    ((11,), 24, 16, 2, True),  # the first batch past the rule's switch
    ((50,), 7, 5, 2, True),  # batch larger than in * out
    ((4, 20), 7, 5, 1, True),
]


def linear_case(batch: tuple[int, ...], d_in: int, d_out: int, rank: int, dtype: torch.dtype,
                bias: bool = True) -> tuple[nn.Module, torch.Tensor]:
    spec = AdapterSpec(num_adaptors=NUM_ADAPTORS, rank=rank, alpha=ALPHA, bias=bias,
                       router=RouterSpec(noise=0.0, temperature=TEMPERATURE))
    model = attach(nn.Sequential(nn.Linear(d_in, d_out)).to(dtype), spec)
    randomize_(model)
    return model, torch.randn(*batch, d_in, dtype=dtype, requires_grad=True)


def naive_linear_mixture(layer: nn.Module, x: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """x W^T + b + alpha * sum_c pi_c (x A_c^T B_c + b_c), one adaptor at a time, by hand."""
    out = x @ layer.base.weight.t() + layer.base.bias
    for c in range(len(pi)):
        delta = (x @ layer.lora_A[c].t()) @ layer.lora_B[c]
        if layer.lora_bias is not None:
            delta = delta + layer.lora_bias[c]
        out = out + ALPHA * pi[c] * delta
    return out


def linear_leaves(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    layer = model[0]
    factors = [p for p in (layer.lora_A, layer.lora_B, layer.lora_bias) if p is not None]
    return [x, layer.base.weight, layer.base.bias, *factors, model.floral_router.logits]


def assert_linear_matches_loop(model: nn.Module, x: torch.Tensor, within: float) -> None:
    """Forward and the gradients of x, W, b, the factors and the router logits, each within
    `within` times its largest entry (sums over rows round in another order than the loop)."""
    fused = model(x)
    expected = naive_linear_mixture(model[0], x, softmax_pi(model.floral_router.logits))
    weights = torch.randn_like(fused)
    leaves = linear_leaves(model, x)
    grads = torch.autograd.grad((fused * weights).sum(), leaves)
    expected_grads = torch.autograd.grad((expected * weights).sum(), leaves)
    for got, want in zip((fused, *grads), (expected, *expected_grads), strict=True):
        assert got.shape == want.shape
        assert want.abs().sum() > 0
        scale = float(want.detach().abs().max())
        torch.testing.assert_close(got, want, rtol=0, atol=within * scale)


@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_mixture_equals_loop_in_float64(shape: tuple, bias: bool) -> None:
    batch, d_in, d_out, rank, merged = shape
    torch.manual_seed(21)
    model, x = linear_case(batch, d_in, d_out, rank, torch.float64, bias)
    assert model[0]._merge_cheaper(x) is merged
    assert_linear_matches_loop(model, x, within=1e-12)


@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=str)
def test_linear_mixture_equals_loop_in_float32(shape: tuple) -> None:
    batch, d_in, d_out, rank, _ = shape
    torch.manual_seed(22)
    model, x = linear_case(batch, d_in, d_out, rank, torch.float32)
    assert_linear_matches_loop(model, x, within=1e-6)


def test_linear_frozen_base_keeps_the_factored_form() -> None:
    """Merging would need the full weight gradient, which a frozen base does not compute."""
    torch.manual_seed(23)
    model, x = linear_case((50,), 7, 5, 2, torch.float64)
    model[0].base.requires_grad_(False)
    assert not model[0]._merge_cheaper(x)
    fused = model(x)
    expected = naive_linear_mixture(model[0], x, softmax_pi(model.floral_router.logits))
    torch.testing.assert_close(fused, expected, **TOLERANCE)
    with torch.no_grad():  # nothing to differentiate: the cheaper form again
        assert model[0]._merge_cheaper(x)
        torch.testing.assert_close(model(x), expected, **TOLERANCE)


# --- routers ------------------------------------------------------------------------------


def two_layer_model(**spec_options: object) -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double()
    options = dict(num_adaptors=NUM_ADAPTORS, rank=RANK, alpha=ALPHA)
    options.update(spec_options)
    attach(model, AdapterSpec(**options))
    randomize_(model)
    return model, torch.randn(4, 5, dtype=torch.float64)


def naive_two_layer(model: nn.Module, x: torch.Tensor, pis: list[torch.Tensor]) -> torch.Tensor:
    hidden = torch.relu(naive_mixture(model[0], x, pis[0]))
    return naive_mixture(model[2], hidden, pis[1])


def test_per_layer_router_gives_each_layer_its_row() -> None:
    torch.manual_seed(5)
    model, x = two_layer_model(router=RouterSpec(per_layer=True, temperature=TEMPERATURE))
    logits = model.floral_router.logits
    assert logits.shape == (2, NUM_ADAPTORS)
    model.eval()
    pis = [softmax_pi(logits[0]), softmax_pi(logits[1])]
    torch.testing.assert_close(model(x), naive_two_layer(model, x, pis), **TOLERANCE)
    weights = mixture_weights(model)
    assert set(weights) == set(adaptor_parameter_names(model))
    for name, pi in weights.items():
        row = 0 if name.startswith("0.") else 1
        torch.testing.assert_close(pi, pis[row].detach(), **TOLERANCE)
        assert not pi.requires_grad


def test_noise_is_drawn_once_per_forward_and_only_in_training() -> None:
    torch.manual_seed(6)
    noise = 0.8
    model, x = two_layer_model(router=RouterSpec(noise=noise, temperature=TEMPERATURE))
    logits = model.floral_router.logits

    torch.manual_seed(123)
    noisy = model(x)
    torch.manual_seed(123)
    drawn = softmax_pi(logits + torch.rand(NUM_ADAPTORS, dtype=torch.float64) * noise)
    torch.testing.assert_close(noisy, naive_two_layer(model, x, [drawn, drawn]), **TOLERANCE)
    assert not torch.allclose(drawn, softmax_pi(logits))

    model.eval()
    clean = softmax_pi(logits)
    torch.testing.assert_close(model(x), naive_two_layer(model, x, [clean, clean]), **TOLERANCE)
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(model.floral_router.weights(), clean, **TOLERANCE)


def test_oracle_router_is_exactly_the_fixed_weights_and_saved() -> None:
    torch.manual_seed(7)
    model, x = two_layer_model(router=RouterSpec(noise=5.0))
    router = model.floral_router
    one_hot = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    router.fix(one_hot)
    model.train()
    assert torch.equal(router.refresh(), one_hot)
    torch.testing.assert_close(model(x), naive_two_layer(model, x, [one_hot, one_hot]),
                               **TOLERANCE)
    for pi in mixture_weights(model).values():
        assert torch.equal(pi, one_hot)

    fresh, _ = two_layer_model()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.floral_router.weights(), one_hot)
    router.unfix()
    assert not torch.equal(router.refresh(), one_hot)
    with pytest.raises(ConfigError, match="router weights"):
        router.fix(torch.ones(5))


@pytest.mark.parametrize(
    "kind", ["linear", "linear-nobias", "conv2d-separable", "batchnorm1d", "layernorm"]
)
def test_single_adaptor_is_plain_lora_without_router(kind: str) -> None:
    torch.manual_seed(8)
    model, x, spec = make_case(kind)
    spec.num_adaptors = 1
    attach(model, spec)
    randomize_(model)
    assert not hasattr(model, "floral_router")
    assert router_parameter_names(model) == []
    ones = torch.ones(1, dtype=torch.float64)
    torch.testing.assert_close(model(x), naive_mixture(model[0], x, ones), **TOLERANCE)
    assert all(torch.equal(pi, ones) for pi in mixture_weights(model).values())
    model.eval()
    torch.testing.assert_close(merge(model)(x), model(x), **TOLERANCE)


# --- attach and names ---------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.embed = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 2)
        self.aux = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3))) + self.aux(self.embed.weight[:1])


def adapted_names(model: nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[0] for name in adaptor_parameter_names(model)}


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, {"features.0", "head", "aux"}),
        ({"layer_types": ("linear",)}, {"head", "aux"}),
        ({"layer_types": ("norm", "embedding")}, {"features.1", "embed"}),
        ({"include": ("features.*", "head")}, {"features.0", "head"}),
        ({"exclude": ("a*",)}, {"features.0", "head"}),
        ({"layer_types": ["linear", "conv2d", "norm"], "include": ["features.*"],
          "exclude": ["*.1"]}, {"features.0"}),
    ],
)
def test_include_exclude_select_layers(options: dict, expected: set[str]) -> None:
    model = attach(Net(), AdapterSpec(num_adaptors=2, rank=1, **options))
    assert adapted_names(model) == expected
    for name in expected:
        assert hasattr(model.get_submodule(name), "base")
    assert router_parameter_names(model) == ["floral_router.logits"]
    params = dict(model.named_parameters())
    for name in adaptor_parameter_names(model):
        assert params[name].shape[0] == 2


def test_attach_errors_are_one_line_config_errors() -> None:
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ConfigError, match="'0'.*groups=2"):
        attach(grouped, AdapterSpec())
    with pytest.raises(ConfigError, match="no layer"):
        attach(Net(), AdapterSpec(include=("nothing*",)))
    adapted = attach(Net(), AdapterSpec(num_adaptors=2))
    with pytest.raises(ConfigError, match="already"):
        attach(adapted, AdapterSpec())
    bad_specs = [
        lambda: AdapterSpec(num_adaptors=0),
        lambda: AdapterSpec(rank=0),
        lambda: AdapterSpec(rank=1.5),
        lambda: AdapterSpec(layer_types=("lstm",)),
        lambda: AdapterSpec(conv_form="dense"),
        lambda: RouterSpec(noise=-1.0),
        lambda: RouterSpec(temperature=0.0),
    ]
    for build in bad_specs:
        with pytest.raises(ConfigError) as error:
            build()
        assert "\n" not in str(error.value)


def test_shared_layer_is_adapted_once_under_every_name() -> None:
    shared = nn.Linear(4, 4)
    model = attach(nn.Sequential(shared, nn.ReLU(), shared), AdapterSpec(num_adaptors=2))
    assert model[0] is model[2] and model[0].base is shared
    assert adaptor_parameter_names(model) == ["0.lora_A", "0.lora_B", "0.lora_bias"]
    merged = merge(model)
    assert merged[0] is merged[2] and type(merged[0]) is nn.Linear


def test_embedding_padding_row_keeps_the_base_vector() -> None:
    torch.manual_seed(11)
    model, x, spec = make_case("embedding")
    plain = copy.deepcopy(model)
    attach(model, spec)
    zeros = torch.zeros(NUM_ADAPTORS, RANK, dtype=torch.float64)
    assert torch.equal(model[0].lora_A[..., 0], zeros)
    with torch.no_grad():
        model[0].lora_B.normal_()
    model(x).square().sum().backward()
    assert torch.equal(model[0].lora_A.grad[..., 0], torch.zeros_like(model[0].lora_A[..., 0]))
    padding = x == 0
    torch.testing.assert_close(model(x)[padding], plain(x)[padding], rtol=0, atol=0)
    assert not torch.allclose(model(x)[~padding], plain(x)[~padding])


def test_deepcopy_of_attached_model_keeps_its_own_router() -> None:
    torch.manual_seed(9)
    model, x = two_layer_model(router=RouterSpec(noise=1.0))
    model(x)  # leaves a cached pi with an autograd graph behind
    twin = copy.deepcopy(model)
    assert twin[0].router is twin.floral_router is not model.floral_router
    model.eval()
    twin.eval()
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    with torch.no_grad():
        twin.floral_router.logits.add_(torch.tensor([5.0, 0.0, 0.0], dtype=torch.float64))
    reference = model(x)
    assert not torch.allclose(twin(x), reference)
    torch.testing.assert_close(model(x), reference, rtol=0, atol=0)


# --- preconditioning and ranks ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "conv2d-separable", "conv2d-kxk-1x1", "embedding"])
def test_precondition_matches_per_adaptor_inverses(kind: str) -> None:
    torch.manual_seed(10)
    model, x, spec = make_case(kind)
    attach(model, spec)
    randomize_(model)
    model(x).square().sum().backward()
    layer, eps = model[0], 1e-3
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    grad_a, grad_b = layer.lora_A.grad.clone(), layer.lora_B.grad.clone()
    bias_grad = layer.lora_bias.grad.clone() if layer.lora_bias is not None else None
    precondition_(model, eps)
    for c in range(NUM_ADAPTORS):
        a_c = a[c].reshape(RANK, -1)  # A_c (r, d_in)
        b_c = b[c].reshape(RANK, -1).t()  # B_c (d_out, r)
        eye = torch.eye(RANK, dtype=a.dtype)
        want_a = torch.linalg.inv(b_c.t() @ b_c + eps * eye) @ grad_a[c].reshape(RANK, -1)
        want_b = grad_b[c].reshape(RANK, -1).t() @ torch.linalg.inv(a_c @ a_c.t() + eps * eye)
        torch.testing.assert_close(layer.lora_A.grad[c].reshape(RANK, -1), want_a, **TOLERANCE)
        torch.testing.assert_close(layer.lora_B.grad[c].reshape(RANK, -1), want_b.t(),
                                   **TOLERANCE)
    if bias_grad is not None:
        assert torch.equal(layer.lora_bias.grad, bias_grad)


def test_resolve_rank() -> None:
    assert resolve_rank(4, 784, 200) == 4
    assert resolve_rank(0.01, 784, 200) == 1
    assert resolve_rank(0.1, 784, 200) == math.floor(0.1 * 784 * 200 / 984) == 15
    assert resolve_rank(0.1, 20, 20) == 1  # 0.1 * 400 / 40 is exactly 1
    assert resolve_rank(0.01, 200, 10) == 1
    assert resolve_rank(0.01, 200, 10, min_rank=3) == 3
    assert resolve_rank(0.5, 200, 10, min_rank=3) == 4
    for bad in (0, -1, 0.0, 1.5, "2"):
        with pytest.raises(ConfigError, match="rank"):
            resolve_rank(bad, 10, 10)


def test_conv_rank_counts_both_factor_widths() -> None:
    model = nn.Sequential(nn.Conv2d(3, 32, 5))
    attach(model, AdapterSpec(rank=0.1, layer_types=("conv2d",)))
    assert model[0].rank == math.floor(0.1 * 15 * 160 / 175)  # d_in = 3*5, d_out = 32*5
    model = nn.Sequential(nn.Conv2d(3, 32, 5))
    attach(model, AdapterSpec(rank=0.1, layer_types=("conv2d",), conv_form="kxk-1x1"))
    assert model[0].rank == math.floor(0.1 * 75 * 32 / 107)  # d_in = 3*5*5, d_out = 32


def test_precondition_rank_one_is_a_division_by_the_squared_norms() -> None:
    torch.manual_seed(11)
    model = attach(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)),
                   AdapterSpec(num_adaptors=3, rank=1))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_B.normal_()
    model(torch.randn(4, 6)).square().sum().backward()
    layer, eps = model[0], 1e-3
    a, b = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    grad_a, grad_b = layer.lora_A.grad.clone(), layer.lora_B.grad.clone()
    precondition_(model, eps)
    for c in range(3):
        torch.testing.assert_close(layer.lora_A.grad[c], grad_a[c] / (b[c].square().sum() + eps))
        torch.testing.assert_close(layer.lora_B.grad[c], grad_b[c] / (a[c].square().sum() + eps))


# -- ranks above what a layer allows: built as asked, never silently ---------------------------
def _rank_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "is more than" in r.getMessage()]


def test_an_integer_rank_above_the_layer_is_never_silent(caplog) -> None:
    with caplog.at_level("WARNING", logger="floral"):
        assert resolve_rank(64, 200, 10, layer="fc2") == 64  # built as asked
        assert resolve_rank(10, 200, 10, layer="fc1") == 10  # exactly min(d_in, d_out): fine
        assert resolve_rank(3, 2, 784) == 3  # no layer name: the sizes say which
        assert resolve_rank(0.01, 200, 2, min_rank=3) == 3  # min_rank lifts a fraction above
    assert _rank_warnings(caplog) == [
        "rank = 64 is more than layer 'fc2' allows (min(d_in, d_out) = min(200, 10) = 10): "
        "54 of its ranks only add parameters",
        "rank = 3 is more than a layer allows (min(d_in, d_out) = min(2, 784) = 2): "
        "1 of its ranks only adds parameters",
        "min_rank = 3 is more than a layer allows (min(d_in, d_out) = min(200, 2) = 2): "
        "1 of its ranks only adds parameters",
    ]


def test_a_fraction_alone_never_exceeds_the_layer(caplog) -> None:
    with caplog.at_level("WARNING", logger="floral"):
        for d_in in (1, 2, 3, 10, 784):
            for d_out in (1, 2, 5, 200):
                for rho in (0.01, 0.1, 0.5, 0.999, 1.0):
                    assert resolve_rank(rho, d_in, d_out) <= min(d_in, d_out)
    assert _rank_warnings(caplog) == []


@pytest.mark.parametrize(
    ("layer", "spec", "allowed"),
    [
        (nn.Linear(20, 3), {"rank": 4}, "min(20, 3) = 3"),
        # Separable conv: d_in = in_channels * kw = 3, d_out = out_channels * kh = 24.
        (nn.Conv2d(1, 8, 3), {"rank": 4, "layer_types": ("conv2d",)}, "min(3, 24) = 3"),
        (nn.Embedding(5, 16), {"rank": 6, "layer_types": ("embedding",)}, "min(5, 16) = 5"),
    ],
)
def test_attach_names_the_layer_whose_rank_is_too_large(caplog, layer, spec, allowed) -> None:
    model = nn.Sequential(layer)
    with caplog.at_level("WARNING", logger="floral"):
        attach(model, AdapterSpec(**spec))
    (message,) = _rank_warnings(caplog)
    assert message.startswith(f"rank = {spec['rank']} is more than layer '0' allows")
    assert allowed in message
    assert model[0].rank == spec["rank"]


def test_attach_is_quiet_when_every_rank_fits(caplog) -> None:
    with caplog.at_level("WARNING", logger="floral"):
        # kxk-1x1 conv: d_in = 1 * 3 * 3 = 9, d_out = 8, so rank 4 fits where separable's 3 not.
        attach(nn.Sequential(nn.Conv2d(1, 8, 3)),
               AdapterSpec(rank=4, layer_types=("conv2d",), conv_form="kxk-1x1"))
        attach(nn.Sequential(nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 10)),
               AdapterSpec(rank=10, num_adaptors=3))
        attach(nn.Sequential(nn.Linear(784, 200), nn.Linear(200, 1)), AdapterSpec(rank=0.1))
    assert _rank_warnings(caplog) == []
