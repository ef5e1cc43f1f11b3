"""Image corruptions whose strength grows over a stream: noise, blur and rotation.

Each corruption maps a batch of images (N, C, H, W) in [0, 1] and a severity in [0, 1] to
corrupted images in [0, 1]; severity 0 leaves the images unchanged. Randomness (noise, the
direction of a rotation) comes only from the generator passed in.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

CORRUPTIONS = ("rotation", "noise", "blur")

MAX_ROTATION_DEGREES = 60.0
MAX_NOISE_SD = 0.6
MAX_BLUR_SIGMA = 1.5  # pixels


def _check(images: Tensor, severity: float) -> None:
    if images.ndim != 4:
        raise ValueError(f"`images` must have shape (N, C, H, W); got {tuple(images.shape)}.")
    if isinstance(severity, bool) or not (0.0 <= float(severity) <= 1.0):
        raise ValueError(f"`severity` must lie in [0, 1]; got {severity!r}.")


def rotate(images: Tensor, severity: float, *, generator: torch.Generator) -> Tensor:
    """Rotate each image by ``severity * 60`` degrees, clockwise or not at random."""
    _check(images, severity)
    n = images.shape[0]
    sign = torch.randint(0, 2, (n,), generator=generator).to(images.dtype) * 2 - 1  # (N,)
    angle = sign * math.radians(MAX_ROTATION_DEGREES * float(severity))  # (N,)
    cos, sin = torch.cos(angle), torch.sin(angle)
    zeros = torch.zeros_like(cos)
    theta = torch.stack(
        [torch.stack([cos, -sin, zeros], -1), torch.stack([sin, cos, zeros], -1)], 1
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # (N, H, W, 2)
    return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros").clamp(0, 1)


def add_noise(images: Tensor, severity: float, *, generator: torch.Generator) -> Tensor:
    """Add Gaussian noise of standard deviation ``severity * 0.6``, then clip to [0, 1]."""
    _check(images, severity)
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype)
    return (images + MAX_NOISE_SD * float(severity) * noise).clamp(0, 1)


def blur(images: Tensor, severity: float, *, generator: torch.Generator) -> Tensor:
    """Gaussian blur of ``severity * 1.5`` pixels (a separable 5-tap kernel per axis)."""
    _check(images, severity)
    sigma = MAX_BLUR_SIGMA * float(severity)
    if sigma == 0.0:
        return images.clone()
    offsets = torch.arange(-2, 3, dtype=images.dtype)  # (5,)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    horizontal = kernel.view(1, 1, 1, 5).repeat(channels, 1, 1, 1)
    vertical = kernel.view(1, 1, 5, 1).repeat(channels, 1, 1, 1)
    out = F.conv2d(F.pad(images, (2, 2, 0, 0), mode="replicate"), horizontal, groups=channels)
    return F.conv2d(F.pad(out, (0, 0, 2, 2), mode="replicate"), vertical, groups=channels)


def corrupt(images: Tensor, kind: str, severity: float, *, generator: torch.Generator) -> Tensor:
    """Apply the corruption ``kind`` (one of :data:`CORRUPTIONS`) at ``severity``."""
    functions = {"rotation": rotate, "noise": add_noise, "blur": blur}
    if kind not in functions:
        raise ValueError(
            f"`kind` must be one of {', '.join(map(repr, CORRUPTIONS))}; got {kind!r}."
        )
    return functions[kind](images, severity, generator=generator)
