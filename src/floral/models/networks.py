"""The networks of the FLoRAL paper's experiments, as plain `nn.Module`s with PyTorch's init."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from floral.errors import ConfigError

__all__ = ["LinearModel", "MLP", "PaperCNN", "VGG8", "VGG8_CHANNELS", "conv_stages"]

# Output channels of VGG-8's convolutions; each is followed by a 2x2 max-pool.
VGG8_CHANNELS: tuple[int, ...] = (16, 32, 64, 128, 512)


class LinearModel(nn.Module):
    """One affine map of the flattened input (kept as a child so adapters can wrap it)."""

    # Its own forward treats each example on its own: the batched engine may stack clients'
    # examples as rows of one batch (floral.adapters.stacked).
    floral_row_wise = True

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.flatten(1))


class MLP(nn.Sequential):
    """Flatten, then Linear + ReLU per hidden width, then a Linear output layer."""

    def __init__(self, in_features: int, hidden: list[int], out_features: int) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        widths = [in_features, *hidden]
        for i, (width_in, width_out) in enumerate(
            zip(widths[:-1], widths[1:], strict=True), start=1
        ):
            layers[f"fc{i}"] = nn.Linear(width_in, width_out)
            layers[f"relu{i}"] = nn.ReLU()
        layers[f"fc{len(widths)}"] = nn.Linear(widths[-1], out_features)
        super().__init__(layers)


class PaperCNN(nn.Module):
    """conv5-32, pool 2, conv3-64, pool 3, fc 64, fc classes (the paper's CIFAR-10 CNN)."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        channels, height, width = input_shape
        feature_height, feature_width = _cnn_feature_size(height), _cnn_feature_size(width)
        if min(feature_height, feature_width) < 1:
            raise ConfigError(
                f"model.name: 'cnn' needs images of at least 14x14, got {height}x{width}"
            )
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(3),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * feature_height * feature_width, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def _cnn_feature_size(size: int) -> int:
    """Side length after PaperCNN's conv5, pool 2, conv3, pool 3 (no padding, floor pooling)."""
    size = (size - 4) // 2
    return (size - 2) // 3 if size >= 3 else 0


def conv_stages(
    input_shape: tuple[int, int, int], widths: tuple[int, ...], name: str
) -> tuple[list[nn.Module], int]:
    """A 3x3 conv (padding 1), ReLU and 2x2 max-pool per width, and the flattened output size.

    `name` is the model's, for the error when the images are too small for that many pools.
    """
    channels, height, width = input_shape
    shrink = 2 ** len(widths)
    if min(height, width) < shrink:
        raise ConfigError(
            f"model.name: '{name}' needs images of at least {shrink}x{shrink},"
            f" got {height}x{width}"
        )
    stages: list[nn.Module] = []
    for width_out in widths:
        stages += [nn.Conv2d(channels, width_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        channels = width_out
    return stages, channels * (height // shrink) * (width // shrink)


class VGG8(nn.Module):
    """VGG-8 without BatchNorm: five conv3 + 2x2 max-pool stages, then three Linear layers."""

    def __init__(
        self, input_shape: tuple[int, int, int], num_classes: int, dropout: float = 0.5
    ) -> None:
        super().__init__()
        stages, flat = conv_stages(input_shape, VGG8_CHANNELS, "vgg8")
        self.features = nn.Sequential(*stages)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(flat, 512),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
