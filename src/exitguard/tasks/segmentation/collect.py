"""One pass over held-out scenes: per-exit confidences and losses, and the tables."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from exitguard.data.images import ImageDataset
from exitguard.nn import EarlyExitNetwork
from exitguard.nn.confidence import AGGREGATIONS, PIXEL_CONFIDENCES, DenseConfidence
from exitguard.risk.exits import as_threshold_grid, default_thresholds, exit_indices
from exitguard.risk.losses import loss_table
from exitguard.tasks.segmentation.losses import SEGMENTATION_RISKS, mean_iou, per_exit_losses


def confidence_measures(*, q: float = 0.05, window: int = 16) -> tuple[DenseConfidence, ...]:
    """Every per-pixel confidence with every aggregation (the paper's Table 1 rows).

    The paper takes the 0.25-quantile on Cityscapes, where every pixel belongs to an object
    class. About 84% of a scene's pixels here are background, on which every exit is sure, so
    a quantile above the foreground share only sees background (the 0.25-quantile is then
    highest at the *first* exit); the default q = 0.05 looks at the items.
    """
    return tuple(
        DenseConfidence(pixel, aggregation, q=q, window=window)
        for pixel in PIXEL_CONFIDENCES
        for aggregation in AGGREGATIONS
    )


@dataclasses.dataclass(frozen=True, repr=False)
class SegmentationOutputs:
    """What the risk core needs from one pass over the held-out scenes.

    Attributes
    ----------
    confidences : dict of name -> array (n, L), float64
        Image-level confidence of every exit under each measure.
    losses : dict of risk -> array (n, L), float64
        Absolute loss of every exit under each risk (see :func:`per_exit_losses`).
    pixel_accuracy, miou : array (n, L)
        Per-image pixel accuracy and mIoU of every exit against the true mask.
    """

    confidences: dict[str, NDArray[np.float64]]
    losses: dict[str, NDArray[np.float64]]
    pixel_accuracy: NDArray[np.float64]
    miou: NDArray[np.float64]

    def __repr__(self) -> str:
        n, n_exits = self.pixel_accuracy.shape
        return (
            f"SegmentationOutputs(n={n}, n_exits={n_exits}, measures={list(self.confidences)}, "
            f"risks={list(self.losses)})"
        )


@torch.inference_mode()
def collect_segmentation(
    network: EarlyExitNetwork,
    scenes: ImageDataset,
    *,
    measures: Sequence[DenseConfidence],
    batch_size: int = 64,
    seed: int = 0,
) -> SegmentationOutputs:
    """Run every exit on every scene once; keep confidences and per-exit losses, not masks.

    The consistency pseudo-labels are drawn per pixel from the full model with U(0, 1)
    numbers of ``numpy.random.default_rng(seed)``, in scene order, so they do not depend on
    ``batch_size``.
    """
    network.eval()
    rng = np.random.default_rng(seed)
    n = len(scenes)
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, n, batch_size):
        images = torch.from_numpy(scenes.images[start : start + batch_size])  # (B, 1, H, W)
        masks = torch.from_numpy(scenes.labels[start : start + batch_size])  # (B, H, W)
        uniform = torch.from_numpy(rng.random(masks.shape))  # (B, H, W) float64
        probs = network(images).softmax(dim=2)  # (B, L, C, H, W)
        predictions = probs.max(dim=2).indices  # (B, L, H, W)
        batch = {f"conf:{measure.__name__}": measure(probs.double()) for measure in measures}
        batch.update(per_exit_losses(probs, masks, uniform, num_classes=scenes.num_classes))
        batch["pixel_accuracy"] = (predictions == masks.unsqueeze(1)).flatten(2).double().mean(-1)
        batch["miou"] = mean_iou(predictions, masks, num_classes=scenes.num_classes)
        for key, value in batch.items():
            parts.setdefault(key, []).append(value.double())
    arrays = {key: torch.cat(values).numpy() for key, values in parts.items()}
    return SegmentationOutputs(
        confidences={
            key.removeprefix("conf:"): arrays[key] for key in arrays if key.startswith("conf:")
        },
        losses={risk: arrays[risk] for risk in SEGMENTATION_RISKS},
        pixel_accuracy=arrays["pixel_accuracy"],
        miou=arrays["miou"],
    )


GRID_STEP = 0.002
"""Step of the threshold grid: finer than classification's, since image-level confidences of
mostly-background scenes crowd near 1."""


def segmentation_tables(
    outputs: SegmentationOutputs,
    *,
    risk: str,
    measure: str,
    exit_flops: NDArray[np.float64],
    full_flops: float,
    thresholds: NDArray[np.float64] | None = None,
) -> dict[str, NDArray[Any]]:
    """Loss, FLOPs and exit tables (K, n) of one risk under one confidence measure.

    Row 0 (never exit early) runs no intermediate head, so it is charged ``full_flops``.
    """
    if risk not in outputs.losses:
        raise ValueError(f"`risk` must be one of {sorted(outputs.losses)}; got {risk!r}.")
    if measure not in outputs.confidences:
        raise ValueError(
            f"`measure` must be one of {sorted(outputs.confidences)}; got {measure!r}."
        )
    grid = as_threshold_grid(default_thresholds(GRID_STEP) if thresholds is None else thresholds)
    exits = exit_indices(outputs.confidences[measure], grid)  # (K, n)
    losses = loss_table(outputs.losses[risk], exits)  # (K, n)
    cost = np.asarray(exit_flops, dtype=np.float64)[exits]  # (K, n)
    cost[0] = full_flops
    return {"losses": losses, "cost": cost, "exits": exits, "thresholds": grid}
