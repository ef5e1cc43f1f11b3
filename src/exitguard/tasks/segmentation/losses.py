"""The four per-image risks of segmentation with image-level exits (the paper's Section 4.2).

A small encoder-decoder segmenter with four exits is trained on scenes of real items
(:mod:`exitguard.data.scenes`). Each exit's dense head decodes its features back to the input
resolution, so every exit gives a full mask. A whole image leaves at the first exit whose
*image-level* confidence (a per-pixel confidence aggregated over the image) reaches the
threshold, exactly as in classification; the four risks below are then controlled per image.

==========================  ==========================================================  ===
risk (the paper's name)     loss of exit ``e`` for one image, minus the last exit's      B
==========================  ==========================================================  ===
prediction_consistency      miscoverage R^C(y): share of pixels whose class differs       1
                            from the full model's
prediction_gap              mIoU gap R^G(y): (1 - mIoU_e) - (1 - mIoU_L) against the      1
                            ground truth
distribution_gap            mean-pixel Brier gap R^G(p) against the ground truth          2
distribution_consistency    mean-pixel Brier consistency R^C(p) against a label drawn     2
                            per pixel from the full model's distribution (seeded)
==========================  ==========================================================  ===

Per-image mIoU averages the IoU over the classes present in the prediction or in the true
mask (the background included); a class absent from both has no IoU (0/0) and is left out,
so an image is not rewarded for classes it does not contain. Since every pixel has a class,
at least one class is always present.
"""

from __future__ import annotations

import torch
from torch import Tensor

RISK_TITLES = {
    "prediction_consistency": "miscoverage R^C(ŷ)",
    "prediction_gap": "mIoU gap R^G(ŷ)",
    "distribution_gap": "mean-pixel Brier gap R^G(p̂)",
    "distribution_consistency": "mean-pixel Brier consistency R^C(p̂)",
}
LOSS_BOUNDS = {
    "prediction_consistency": 1.0,
    "prediction_gap": 1.0,
    "distribution_gap": 2.0,
    "distribution_consistency": 2.0,
}
SEGMENTATION_RISKS = tuple(RISK_TITLES)


def miscoverage(predictions: Tensor) -> Tensor:
    """Share of pixels whose class differs from the last exit's: (B, L, H, W) -> (B, L)."""
    return (predictions != predictions[:, -1:]).flatten(2).double().mean(dim=-1)


def mean_iou(predictions: Tensor, masks: Tensor, *, num_classes: int) -> Tensor:
    """Per-image mean IoU of every exit against the true mask: (B, L, H, W), (B, H, W) -> (B, L).

    The mean runs over the classes present in the prediction or in the mask; a class absent
    from both (IoU 0/0) is left out.
    """
    batch, n_exits = predictions.shape[:2]
    truth = masks.unsqueeze(1).expand_as(predictions)  # (B, L, H, W)
    image = torch.arange(batch * n_exits, device=predictions.device).view(batch, n_exits, 1, 1)
    cell = (image * num_classes + truth) * num_classes + predictions  # (B, L, H, W)
    confusion = torch.bincount(cell.flatten(), minlength=batch * n_exits * num_classes**2)
    confusion = confusion.view(batch, n_exits, num_classes, num_classes).double()  # [true, pred]
    intersection = confusion.diagonal(dim1=-2, dim2=-1)  # (B, L, C)
    union = confusion.sum(dim=-1) + confusion.sum(dim=-2) - intersection  # (B, L, C)
    present = union > 0
    iou = torch.where(present, intersection / union.clamp(min=1), 0.0)  # (B, L, C)
    return iou.sum(dim=-1) / present.sum(dim=-1)  # (B, L)


def mean_pixel_brier(probs: Tensor, labels: Tensor) -> Tensor:
    """Brier loss summed over classes, averaged over pixels: (B, L, C, H, W), (B, H, W) -> (B, L).

    In [0, 2].
    """
    squared = probs.square().sum(dim=2)  # (B, L, H, W)
    index = labels.unsqueeze(1).unsqueeze(2).expand(-1, probs.shape[1], 1, -1, -1)
    at_label = probs.gather(2, index).squeeze(2)  # (B, L, H, W)
    return (squared - 2.0 * at_label + 1.0).clamp(0.0, 2.0).flatten(2).mean(dim=-1)


def sample_pixel_labels(probs: Tensor, uniform: Tensor) -> Tensor:
    """One label per pixel drawn from ``probs`` by inverse CDF.

    Shapes: probs (B, C, H, W), uniform (B, H, W) -> labels (B, H, W).

    ``uniform`` holds the U(0, 1) draws, so the labels are fixed by whoever made them.
    """
    cumulative = probs.cumsum(dim=1)  # (B, C, H, W)
    target = uniform.unsqueeze(1) * cumulative[:, -1:]  # (B, 1, H, W)
    labels = (cumulative <= target).sum(dim=1)  # (B, H, W)
    return labels.clamp(max=probs.shape[1] - 1)


def per_exit_losses(
    probs: Tensor, masks: Tensor, uniform: Tensor, *, num_classes: int
) -> dict[str, Tensor]:
    """Absolute loss of every exit under the four risks: (B, L, C, H, W) -> {risk: (B, L)}.

    The table entry of a risk is the loss at the exit taken minus the last exit's (see
    :func:`exitguard.risk.losses.loss_table`); miscoverage is 0 at the last exit.
    """
    predictions = probs.max(dim=2).indices  # (B, L, H, W)
    pseudo = sample_pixel_labels(probs[:, -1], uniform)  # (B, H, W)
    return {
        "prediction_consistency": miscoverage(predictions),
        "prediction_gap": 1.0 - mean_iou(predictions, masks, num_classes=num_classes),
        "distribution_gap": mean_pixel_brier(probs.double(), masks),
        "distribution_consistency": mean_pixel_brier(probs.double(), pseudo),
    }
