"""Concept shifts that make clusters of clients disagree: rotated images, relabelled classes.

Each function acts on a whole batch at once, so a cluster's data is shifted in one call.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from floral.config import choices

__all__ = [
    "SHIFTS", "Shift", "rotation_angle", "rotate", "rotate_bilinear", "shift_labels",
    "in_label_set",
]

# The last two are label-skew partitions (floral.data.partition), not concept shifts: every
# client reads labels the same way, but each holds its own mix of classes.
Shift = Literal["none", "rotate", "label-shift", "label-set", "dirichlet", "classes-per-client"]
SHIFTS: tuple[str, ...] = choices(Shift)


def rotation_angle(cluster: int, num_clusters: int) -> float:
    """Degrees by which the `rotate` shift turns the images of `cluster`: 360 / C per cluster."""
    return 360.0 * cluster / num_clusters


def rotate(images: Tensor, degrees: float) -> Tensor:
    """Images (..., H, W) turned counterclockwise by `degrees`, padded with zeros.

    Multiples of 90 degrees are exact pixel permutations; other angles interpolate bilinearly.
    """
    quarter_turns, remainder = divmod(degrees, 90.0)
    if math.isclose(remainder, 0.0, abs_tol=1e-9) or math.isclose(remainder, 90.0, abs_tol=1e-9):
        turns = int(round(degrees / 90.0)) % 4
        return torch.rot90(images, turns, dims=(-2, -1)) if turns else images.clone()
    return rotate_bilinear(images, degrees)


def rotate_bilinear(images: Tensor, degrees: float) -> Tensor:
    """Counterclockwise rotation about the image centre by resampling (any angle)."""
    height, width = images.shape[-2:]
    batch = images.reshape(-1, 1, height, width)
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    # affine_grid works in coordinates normalized to [-1, 1] per axis (y pointing down); the
    # inverse rotation is conjugated by the aspect ratio so that non-square images turn rigidly.
    matrix = torch.tensor(
        [[cos, -sin * height / width, 0.0], [sin * width / height, cos, 0.0]],
        dtype=images.dtype,
    )
    # One sampling grid serves the whole batch: every image turns by the same angle.
    grid = F.affine_grid(matrix[None], [1, 1, height, width], align_corners=False)
    grid = grid.expand(batch.shape[0], -1, -1, -1)
    turned = F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return turned.reshape(images.shape)


def shift_labels(labels: Tensor, offset: int, num_classes: int) -> Tensor:
    """The `label-shift` shift: y -> (y + offset) mod num_classes."""
    return (labels + offset) % num_classes


def in_label_set(labels: np.ndarray, cluster: int, num_clusters: int) -> np.ndarray:
    """The `label-set` shift: a mask of the samples cluster `cluster` owns (y = cluster mod C)."""
    return labels % num_clusters == cluster
