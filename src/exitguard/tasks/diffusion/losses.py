"""Bounded per-sample losses between an early-exit image and the full model's image.

Both compare two images generated from the same noise, so they need no labels and lie in
[0, 1] (loss bound B = 1); identical images have loss exactly 0.

- ``ssim`` (the default): ``(1 - SSIM) / 2`` with SSIM (Wang et al., 2004) on images mapped
  to [0, 1], a Gaussian window, and the usual constants ``C1 = (0.01)^2``,
  ``C2 = (0.03)^2``. It needs no second model, so a table depends on the denoiser alone.
- ``features``: ``1 - cos`` between the images' features in a trained classifier (the average
  pooled output of the last stage of the project's multi-exit CNN, trained on the same
  dataset, see :func:`exitguard.tasks.classification.load_or_train`). The features follow a
  ReLU, so they are non-negative and the cosine lies in [0, 1]. A perceptual distance in the
  spirit of LPIPS (which DeeDiff's risk uses), from a model trained here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

LOSSES = ("ssim", "features")
"""The per-sample losses a sweep can tabulate."""


def ssim_window(side: int) -> tuple[int, float]:
    """The Gaussian window (size, sigma) used for images whose smaller side is ``side``.

    Wang et al.'s 11 x 11 window with sigma 1.5 when the image holds at least two windows
    across (28 x 28 Fashion-MNIST: 18 x 18 window positions); a 5 x 5 window with sigma 1 on
    smaller images (8 x 8 digits: 4 x 4 positions).
    """
    return (11, 1.5) if side >= 22 else (5, 1.0)


def gaussian_window(size: int, sigma: float) -> Tensor:
    """A normalised 2-D Gaussian window (size, size), float64."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0  # (size,)
    g = torch.exp(-(coords**2) / (2.0 * sigma**2))  # (size,)
    g = g / g.sum()
    return g[:, None] * g[None, :]  # (size, size)


def _check_pair(x: Any, y: Any) -> tuple[Tensor, Tensor]:
    for name, value in (("x", x), ("y", y)):
        if not isinstance(value, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor; got {type(value).__name__}.")
        if value.ndim != 4:
            raise ValueError(
                f"`{name}` must be a batch of images (B, C, H, W); got shape {tuple(value.shape)}."
            )
    if x.shape != y.shape:
        raise ValueError(
            f"`x` and `y` must have the same shape; got {tuple(x.shape)} and {tuple(y.shape)}."
        )
    return x, y


def ssim(
    x: Tensor,
    y: Tensor,
    *,
    window_size: int | None = None,
    sigma: float | None = None,
    data_range: float = 1.0,
) -> Tensor:
    """Mean SSIM of each image pair, float64 (B,), in [-1, 1].

    Local means, variances and covariance are Gaussian-weighted (no sample-size correction)
    over every position where the window fits inside the image ("valid"), per channel;
    SSIM is averaged over positions and channels.

    Parameters
    ----------
    x, y : Tensor of shape (B, C, H, W)
        Images in [0, ``data_range``].
    window_size, sigma : optional
        The Gaussian window; by default :func:`ssim_window` of the smaller side.
    data_range : float
        The images' value range (1 for [0, 1]).

    Raises
    ------
    ValueError
        When the window does not fit the images or the shapes differ.
    """
    x, y = _check_pair(x, y)
    default_size, default_sigma = ssim_window(min(x.shape[-2:]))
    size = default_size if window_size is None else window_size
    spread = default_sigma if sigma is None else sigma
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= min(x.shape[-2:]):
        raise ValueError(
            f"`window_size` must be an integer in [1, {min(x.shape[-2:])}] (the smaller image "
            f"side); got {size!r}."
        )
    if not spread > 0:
        raise ValueError(f"`sigma` must be a positive float; got {spread!r}.")
    channels = x.shape[1]
    window = gaussian_window(size, spread).to(x.device)[None, None]  # (1, 1, k, k)
    window = window.expand(channels, 1, size, size)  # (C, 1, k, k)
    a, b = x.double(), y.double()

    def blur(z: Tensor) -> Tensor:
        return F.conv2d(z, window, groups=channels)  # (B, C, H-k+1, W-k+1)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a * mu_a
    var_b = blur(b * b) - mu_b * mu_b
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    )  # (B, C, H', W')
    return index.flatten(1).mean(dim=1)  # (B,)


def _identical(x: Tensor, y: Tensor) -> Tensor:
    return (x == y).flatten(1).all(dim=1)  # (B,)


def ssim_loss(x: Tensor, y: Tensor, **kwargs: Any) -> Tensor:
    """``(1 - SSIM) / 2`` per pair, float64 (B,), in [0, 1]; exactly 0 for identical images.

    ``x`` and ``y`` are images in [0, 1] (B, C, H, W); ``kwargs`` go to :func:`ssim`.
    """
    loss = ((1.0 - ssim(x, y, **kwargs)) / 2.0).clamp(0.0, 1.0)  # (B,)
    return torch.where(_identical(x, y), torch.zeros_like(loss), loss)


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """``1 - cos(a, b)`` per row of non-negative features (B, D), float64, in [0, 1].

    Rows that are equal give exactly 0; a zero row against a non-zero one gives 1.
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(
            f"`a` and `b` must be (B, D) of the same shape; got {tuple(a.shape)} and "
            f"{tuple(b.shape)}."
        )
    a64, b64 = a.double(), b.double()
    cos = F.cosine_similarity(a64, b64, dim=1, eps=1e-12)  # (B,)
    distance = (1.0 - cos).clamp(0.0, 1.0)
    return torch.where((a64 == b64).all(dim=1), torch.zeros_like(distance), distance)


class FeatureDistance:
    """``1 - cos`` between classifier features of two images in [0, 1] (B, C, H, W).

    Parameters
    ----------
    network : exitguard.nn.EarlyExitNetwork
        A trained classifier taking images in [0, 1] of the same shape; its last stage's
        output (B, F, h, w), average pooled, is the feature vector (non-negative after the
        stage's ReLU).
    batch_size : int
        Images per forward pass.
    """

    def __init__(self, network: Any, *, batch_size: int = 512) -> None:
        self.network = network
        self.batch_size = batch_size

    @torch.inference_mode()
    def features(self, images: Tensor) -> Tensor:
        """(B, C, H, W) in [0, 1] -> (B, F) float32 features."""
        parts = []
        for batch in torch.split(images, self.batch_size):  # a loop over batches: memory
            maps = self.network.forward_intermediates(batch, indices=[-1])[0]  # (b, F, h, w)
            parts.append(maps.flatten(2).mean(-1))  # (b, F)
        return torch.cat(parts)

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-pair distance (B,), float64, in [0, 1]; exactly 0 for identical images."""
        x, y = _check_pair(x, y)
        distance = cosine_distance(self.features(x), self.features(y))
        return torch.where(_identical(x, y), torch.zeros_like(distance), distance)

    def __repr__(self) -> str:
        return f"FeatureDistance({type(self.network).__name__}, batch_size={self.batch_size})"
