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

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

ConfidenceFn = Callable[[Tensor], Tensor]


def _mean_over_positions(scores: Tensor) -> Tensor:
    """(B, L, *S) -> (B, L): average a dense per-position score over positions."""
    return scores.flatten(2).mean(dim=-1) if scores.ndim > 2 else scores


def max_softmax(probs: Tensor) -> Tensor:
    """Top-1 probability (the paper's default)."""
    return _mean_over_positions(probs.amax(dim=2))  # (B, L)


def margin(probs: Tensor) -> Tensor:
    """Top-1 minus top-2 probability."""
    if probs.shape[2] < 2:
        return probs.new_ones(probs.shape[:2])
    top2 = probs.topk(2, dim=2).values  # (B, L, 2, *S): [first, second]
    return _mean_over_positions(top2[:, :, 0] - top2[:, :, 1])  # (B, L)


def entropy(probs: Tensor) -> Tensor:
    """One minus the entropy normalised by log C (0 log 0 = 0)."""
    n_classes = probs.shape[2]
    if n_classes < 2:
        return probs.new_ones(probs.shape[:2])
    normalised = torch.special.entr(probs).sum(dim=2) / math.log(n_classes)  # (B, L, *S)
    return _mean_over_positions((1.0 - normalised).clamp(0.0, 1.0))  # (B, L)


def patience(probs: Tensor, *, k: int = 2) -> Tensor:
    """PABEE-style patience: the share of the previous ``k`` exits that agree with this one.

    Confidence at exit ``l`` is the length of the run of consecutive exits ending at ``l``
    whose argmax equals exit ``l``'s, excluding ``l`` itself, divided by ``k`` and capped at 1.
    A threshold of 1 therefore means "the prediction has not changed for ``k`` exits".
    Use ``functools.partial(patience, k=3)`` for another ``k``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be an integer >= 1; got {k!r}.")
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
