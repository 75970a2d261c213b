"""floral.models: shapes, parameter counts, the automatic choice and bad settings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from floral.data import FederatedTask
from floral.errors import ConfigError
from floral.models import MLP, VGG8, LinearModel, ModelConfig, PaperCNN, build_model

_SHAPES = {
    "synthetic-linear": ((10,), 3, "regression"),
    "synthetic-mlp": ((10,), 1, "regression"),
    "mnist": ((1, 28, 28), 10, "classification"),
    "fashion-mnist": ((1, 28, 28), 10, "classification"),
    "mnist5k": ((1, 28, 28), 10, "classification"),
    "digits": ((1, 8, 8), 10, "classification"),
    "cifar10": ((3, 32, 32), 10, "classification"),
    "cifar100": ((3, 32, 32), 100, "classification"),
}


def fake_task(name: str) -> FederatedTask:
    input_shape, outputs, kind = _SHAPES[name]
    return FederatedTask(name, kind, input_shape, outputs, num_clusters=4, clients=[])


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def layers_of(model: nn.Module, kind: type[nn.Module]) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kind)]


@pytest.mark.parametrize(
    ("dataset", "model_type", "widths"),
    [
        ("synthetic-linear", LinearModel, [(10, 3)]),
        ("synthetic-mlp", MLP, [(10, 20), (20, 1)]),
        ("mnist", MLP, [(784, 200), (200, 10)]),
        ("fashion-mnist", MLP, [(784, 200), (200, 10)]),
        ("mnist5k", MLP, [(784, 200), (200, 10)]),
        ("digits", MLP, [(64, 200), (200, 10)]),
        ("cifar10", PaperCNN, [(1024, 64), (64, 10)]),
        ("cifar100", VGG8, [(512, 512), (512, 512), (512, 100)]),
    ],
)
def test_auto_picks_the_papers_model(dataset, model_type, widths):
    task = fake_task(dataset)
    model = build_model(ModelConfig(), task)
    assert type(model) is model_type
    linears = [(m.in_features, m.out_features) for m in layers_of(model, nn.Linear)]
    assert linears == widths
    batch = torch.randn(2, *task.input_shape)
    assert model(batch).shape == (2, task.num_outputs)


def test_mnist_mlp_parameter_count():
    model = build_model(ModelConfig(name="mlp", hidden=[200]), fake_task("mnist"))
    assert num_parameters(model) == 784 * 200 + 200 + 200 * 10 + 10


def test_mlp_hidden_widths_are_used_in_order():
    model = build_model(ModelConfig(name="mlp", hidden=[32, 16]), fake_task("digits"))
    assert num_parameters(model) == 64 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    relu_count = len(layers_of(model, nn.ReLU))
    assert relu_count == 2


def test_mlp_computes_linear_relu_linear():
    model = MLP(4, [3], 2)
    x = torch.randn(5, 4)
    fc1, fc2 = layers_of(model, nn.Linear)
    expected = torch.relu(x @ fc1.weight.T + fc1.bias) @ fc2.weight.T + fc2.bias
    torch.testing.assert_close(model(x), expected)


def test_paper_cnn_layers_and_parameter_count():
    model = PaperCNN((3, 32, 32), 10)
    expected = (3 * 32 * 25 + 32) + (32 * 64 * 9 + 64) + (64 * 4 * 4 * 64 + 64) + (64 * 10 + 10)
    assert num_parameters(model) == expected
    pools = [m.kernel_size for m in layers_of(model, nn.MaxPool2d)]
    assert pools == [2, 3]


@pytest.mark.parametrize(("size", "side"), [(28, 3), (32, 4), (40, 5)])
def test_paper_cnn_flattened_size_follows_the_input(size, side):
    model = PaperCNN((1, size, size), 7)
    first_linear = layers_of(model, nn.Linear)[0]
    assert first_linear.in_features == 64 * side * side
    assert model(torch.randn(2, 1, size, size)).shape == (2, 7)


def test_vgg8_has_five_convolutions_no_batchnorm_and_scales_with_input():
    model = VGG8((3, 64, 64), 100)
    convs = layers_of(model, nn.Conv2d)
    assert [c.out_channels for c in convs] == [16, 32, 64, 128, 512]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert not layers_of(model, nn.BatchNorm2d)
    assert len(layers_of(model, nn.Dropout)) == 2
    assert layers_of(model, nn.Linear)[0].in_features == 512 * 2 * 2
    model.eval()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 100)


@pytest.mark.parametrize("dataset", sorted(_SHAPES))
def test_init_is_deterministic_under_manual_seed(dataset):
    task = fake_task(dataset)
    torch.manual_seed(0)
    first = build_model(ModelConfig(), task).state_dict()
    torch.manual_seed(0)
    second = build_model(ModelConfig(), task).state_dict()
    torch.manual_seed(1)
    third = build_model(ModelConfig(), task).state_dict()
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key])
    assert any(not torch.equal(first[key], third[key]) for key in first)


@pytest.mark.parametrize(
    ("cfg", "dataset"),
    [
        (ModelConfig(name="resnet"), "mnist"),
        (ModelConfig(name="cnn"), "synthetic-linear"),
        (ModelConfig(name="cnn"), "digits"),
        (ModelConfig(name="vgg8"), "mnist"),
        (ModelConfig(name="mlp", hidden=[0]), "mnist"),
    ],
)
def test_bad_model_settings_raise_config_error(cfg, dataset):
    with pytest.raises(ConfigError) as error:
        build_model(cfg, fake_task(dataset))
    message = str(error.value)
    assert message.startswith("model.") and "\n" not in message
