"""Confidence measures in torch: per-exit probabilities (B, L, C, ...) -> (B, L) in [0, 1].

Higher means safer to stop. The definitions are those of :mod:`exitguard.risk.confidence`
(the numpy reference) and agree with it numerically; the class axis is axis 2.

Dense outputs of shape (B, L, C, *S) (one prediction per pixel or position) get one
confidence per sample and exit: the per-position confidence, averaged over positions.

A measure used for real early exit must be *causal*: its value at exit ``l`` may depend on
exits ``0..l`` only, since later exits have not been computed when the decision is taken.
All four built-in measures are causal. A measure is *pointwise* when its value at exit ``l``
depends on exit ``l`` alone; :meth:`EarlyExitNetwork.infer` then evaluates it on the current
exit only instead of on the whole history.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from exitguard.risk._validation import check_int

ConfidenceFn = Callable[[Tensor], Tensor]


def _mean_over_positions(scores: Tensor) -> Tensor:
    """(B, L, *S) -> (B, L): average a dense per-position score over positions."""
    return scores.flatten(2).mean(dim=-1) if scores.ndim > 2 else scores


def pixel_max_softmax(probs: Tensor) -> Tensor:
    """Top-1 probability at every position: (B, L, C, *S) -> (B, L, *S)."""
    return probs.amax(dim=2)


def pixel_margin(probs: Tensor) -> Tensor:
    """Top-1 minus top-2 probability at every position: (B, L, C, *S) -> (B, L, *S)."""
    if probs.shape[2] < 2:
        return probs.new_ones(probs.shape[:2] + probs.shape[3:])
    top2 = probs.topk(2, dim=2).values  # (B, L, 2, *S): [first, second]
    return top2[:, :, 0] - top2[:, :, 1]  # (B, L, *S)


def pixel_entropy(probs: Tensor) -> Tensor:
    """One minus the entropy normalised by log C at every position (0 log 0 = 0)."""
    n_classes = probs.shape[2]
    if n_classes < 2:
        return probs.new_ones(probs.shape[:2] + probs.shape[3:])
    normalised = torch.special.entr(probs).sum(dim=2) / math.log(n_classes)  # (B, L, *S)
    return (1.0 - normalised).clamp(0.0, 1.0)


def max_softmax(probs: Tensor) -> Tensor:
    """Top-1 probability (the paper's default)."""
    return _mean_over_positions(pixel_max_softmax(probs))  # (B, L)


def margin(probs: Tensor) -> Tensor:
    """Top-1 minus top-2 probability."""
    return _mean_over_positions(pixel_margin(probs))  # (B, L)


def entropy(probs: Tensor) -> Tensor:
    """One minus the entropy normalised by log C (0 log 0 = 0)."""
    return _mean_over_positions(pixel_entropy(probs))  # (B, L)


def patience(probs: Tensor, *, k: int = 2) -> Tensor:
    """PABEE-style patience: the share of the previous ``k`` exits that agree with this one.

    Confidence at exit ``l`` is the length of the run of consecutive exits ending at ``l``
    whose argmax equals exit ``l``'s, excluding ``l`` itself, divided by ``k`` and capped at 1.
    A threshold of 1 therefore means "the prediction has not changed for ``k`` exits".
    Use ``functools.partial(patience, k=3)`` for another ``k``.
    """
    check_int(k, "k")
    predictions = probs.argmax(dim=2)  # (B, L, *S), first maximum on ties like numpy
    runs = torch.zeros(predictions.shape, dtype=probs.dtype, device=probs.device)  # (B, L, *S)
    # A loop over the (few) exits: each run length depends on the previous one.
    for exit_ in range(1, predictions.shape[1]):
        same = predictions[:, exit_] == predictions[:, exit_ - 1]
        runs[:, exit_] = torch.where(same, runs[:, exit_ - 1] + 1, 0.0)
    return _mean_over_positions((runs / k).clamp(max=1.0))  # (B, L)


CONFIDENCES: dict[str, ConfidenceFn] = {
    "max_softmax": max_softmax,
    "margin": margin,
    "entropy": entropy,
    "patience": patience,
}
"""The built-in measures by name."""

_POINTWISE: frozenset[ConfidenceFn] = frozenset({max_softmax, margin, entropy})

PIXEL_CONFIDENCES: dict[str, ConfidenceFn] = {
    "max_softmax": pixel_max_softmax,
    "margin": pixel_margin,
    "entropy": pixel_entropy,
}
"""Per-pixel measures of dense outputs, (B, L, C, H, W) -> (B, L, H, W), by name."""

AGGREGATIONS = ("mean", "quantile", "patch")
"""How :func:`aggregate` turns per-pixel confidences into one score per image."""


def aggregate(
    scores: Tensor, *, aggregation: str = "mean", q: float = 0.25, window: int = 16
) -> Tensor:
    """One confidence per image and exit from per-pixel confidences: (B, L, H, W) -> (B, L).

    ``"mean"``: the mean over pixels. ``"quantile"``: the ``q``-quantile over pixels (linear
    interpolation, as ``numpy.quantile``); a low ``q`` asks most of the image to be confident.
    ``"patch"``: the minimum over all ``window`` x ``window`` sliding windows (stride 1) of
    the window's mean, the paper's patch rule: no region may be unsure as a whole. A window
    larger than the image is clipped to the image.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(
            f"`aggregation` must be one of {', '.join(map(repr, AGGREGATIONS))}; "
            f"got {aggregation!r}."
        )
    if scores.ndim != 4:
        raise ValueError(f"`scores` must have shape (B, L, H, W); got {tuple(scores.shape)}.")
    flat = scores.flatten(2)  # (B, L, H*W)
    if aggregation == "mean":
        return flat.mean(dim=-1)
    if aggregation == "quantile":
        if not 0.0 <= float(q) <= 1.0:
            raise ValueError(f"`q` must lie in [0, 1]; got {q!r}.")
        return torch.quantile(flat, float(q), dim=-1)
    check_int(window, "window")
    batch, n_exits, height, width = scores.shape
    kernel = (min(window, height), min(window, width))
    means = F.avg_pool2d(scores.reshape(batch * n_exits, 1, height, width), kernel, stride=1)
    return means.flatten(1).amin(dim=-1).reshape(batch, n_exits)  # (B, L)


@dataclasses.dataclass(frozen=True)
class DenseConfidence:
    """A per-image confidence for dense outputs: a per-pixel measure, then an aggregation.

    Called on probabilities (B, L, C, H, W), it returns (B, L) in [0, 1]. It is pointwise
    (exit ``l`` needs exit ``l`` only), so :meth:`EarlyExitNetwork.infer` evaluates it on the
    current exit alone. Its name (e.g. ``"margin/patch(window=16)"``) is what a calibrated
    policy records.

    Examples
    --------
    >>> import torch
    >>> measure = DenseConfidence("max_softmax", "quantile", q=0.25)
    >>> measure.__name__
    'max_softmax/quantile(q=0.25)'
    >>> measure(torch.full((2, 3, 4, 5, 5), 0.25)).shape
    torch.Size([2, 3])
    """

    pixel: str = "max_softmax"
    aggregation: str = "mean"
    q: float = 0.25
    window: int = 16
    pointwise: bool = dataclasses.field(default=True, init=False)

    def __post_init__(self) -> None:
        if self.pixel not in PIXEL_CONFIDENCES:
            raise ValueError(
                f"`pixel` must be one of {', '.join(map(repr, PIXEL_CONFIDENCES))}; "
                f"got {self.pixel!r}."
            )
        aggregate(
            torch.zeros(1, 1, 1, 1), aggregation=self.aggregation, q=self.q, window=self.window
        )

    @property
    def __name__(self) -> str:  # type: ignore[override]
        if self.aggregation == "quantile":
            return f"{self.pixel}/quantile(q={self.q:g})"
        if self.aggregation == "patch":
            return f"{self.pixel}/patch(window={self.window})"
        return f"{self.pixel}/mean"

    def __call__(self, probs: Tensor) -> Tensor:
        if probs.ndim != 5:
            raise ValueError(
                f"a dense confidence needs probabilities (B, L, C, H, W); got {tuple(probs.shape)}."
            )
        scores = PIXEL_CONFIDENCES[self.pixel](probs)  # (B, L, H, W)
        return aggregate(scores, aggregation=self.aggregation, q=self.q, window=self.window)


def is_pointwise(measure: ConfidenceFn) -> bool:
    """True when the measure's value at an exit depends on that exit alone.

    Built-in measures know; a custom callable declares it with an attribute
    ``pointwise = True`` (the safe default is False: the whole history is passed).
    """
    return measure in _POINTWISE or bool(getattr(measure, "pointwise", False))


def measure_name(measure: ConfidenceFn) -> str:
    """A readable, stable name for a measure, e.g. ``"patience(k=3)"``."""
    if isinstance(measure, functools.partial):
        arguments = ", ".join(f"{key}={value!r}" for key, value in measure.keywords.items())
        return f"{measure_name(measure.func)}({arguments})"
    for name, builtin in CONFIDENCES.items():
        if measure is builtin:
            return name
    return str(getattr(measure, "__name__", type(measure).__name__))


def resolve_measure(
    measure: str | ConfidenceFn, *, argument: str = "confidence"
) -> tuple[str, ConfidenceFn]:
    """Turn a measure name or callable into ``(name, function)``; errors name ``argument``."""
    if isinstance(measure, str):
        if measure not in CONFIDENCES:
            allowed = ", ".join(repr(name) for name in CONFIDENCES)
            raise ValueError(
                f"`{argument}` must be one of {allowed} or a callable; got {measure!r}."
            )
        return measure, CONFIDENCES[measure]
    if not callable(measure):
        raise TypeError(
            f"`{argument}` must be a measure name or a callable mapping probabilities "
            f"(B, L, C) to confidences (B, L); got {type(measure).__name__}."
        )
    return measure_name(measure), measure


def confidences(probs: Tensor, *, measure: str | ConfidenceFn = "max_softmax") -> Tensor:
    """Confidence of every sample at every exit, validated.

    Parameters
    ----------
    probs : Tensor of shape (B, L, C) or (B, L, C, *S)
        Per-exit class probabilities (class axis 2).
    measure : {"max_softmax", "margin", "entropy", "patience"} or callable
        A callable gets the probabilities and must return (B, L) values in [0, 1].

    Returns
    -------
    Tensor of shape (B, L)
        In the dtype of ``probs``, clipped to [0, 1].

    Raises
    ------
    ValueError
        If ``probs`` has fewer than 3 dimensions or the measure returns a wrong shape or
        values outside [0, 1].
    """
    if not isinstance(probs, Tensor):
        raise TypeError(f"`probs` must be a torch.Tensor; got {type(probs).__name__}.")
    if probs.ndim < 3:
        raise ValueError(
            f"`probs` must have shape (B, L, C) or (B, L, C, ...); got {tuple(probs.shape)}."
        )
    name, fn = resolve_measure(measure, argument="measure")
    scores = fn(probs)
    if not isinstance(scores, Tensor) or tuple(scores.shape) != tuple(probs.shape[:2]):
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(
            f"confidence measure {name!r} must return shape {tuple(probs.shape[:2])}; got {got}."
        )
    if not bool(torch.isfinite(scores).all()) or bool(
        ((scores < -1e-6) | (scores > 1 + 1e-6)).any()
    ):
        raise ValueError(f"confidence measure {name!r} must return finite values in [0, 1].")
    return scores.clamp(0.0, 1.0)
