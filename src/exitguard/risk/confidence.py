"""Confidence measures on per-exit probabilities: (n, L, C) -> (n, L), values in [0, 1].

Higher means safer to stop. These numpy versions are the reference definitions; the torch
versions in :mod:`exitguard.nn` must agree with them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike, NDArray

from exitguard.risk._validation import as_float_array, check_choice, check_int, check_probabilities

ConfidenceFn = Callable[[NDArray[np.float64]], NDArray[np.float64]]


def max_softmax(probs: NDArray[np.float64]) -> NDArray[np.float64]:
    """Top-1 probability (the paper's default)."""
    return probs.max(axis=-1)


def margin(probs: NDArray[np.float64]) -> NDArray[np.float64]:
    """Top-1 minus top-2 probability."""
    if probs.shape[-1] < 2:
        return np.ones(probs.shape[:-1])
    top2 = np.partition(probs, -2, axis=-1)[..., -2:]  # (..., 2): [second, first]
    return top2[..., 1] - top2[..., 0]


def entropy(probs: NDArray[np.float64]) -> NDArray[np.float64]:
    """One minus the entropy normalised by log C (0 log 0 = 0)."""
    n_classes = probs.shape[-1]
    if n_classes < 2:
        return np.ones(probs.shape[:-1])
    from scipy.special import entr  # imported on use: `import exitguard` stays light

    normalised = entr(probs).sum(axis=-1) / np.log(n_classes)
    return np.clip(1.0 - normalised, 0.0, 1.0)


def patience(probs: NDArray[np.float64], *, k: int = 2) -> NDArray[np.float64]:
    """PABEE-style patience: the share of the previous ``k`` exits that agree with this one.

    Confidence at exit ``l`` is the length of the run of consecutive exits ending at ``l`` whose
    argmax equals exit ``l``'s, excluding ``l`` itself, divided by ``k`` and capped at 1. A
    threshold of 1 therefore means "the prediction has not changed for ``k`` exits".
    """
    k = check_int(k, "k", minimum=1)
    predictions = probs.argmax(axis=-1)  # (n, L)
    n_exits = predictions.shape[-1]
    runs = np.zeros(predictions.shape, dtype=np.float64)  # (n, L)
    # A loop over the (few) exits: each run length depends on the previous one.
    for exit_ in range(1, n_exits):
        same = predictions[..., exit_] == predictions[..., exit_ - 1]
        runs[..., exit_] = np.where(same, runs[..., exit_ - 1] + 1, 0)
    return np.minimum(runs / k, 1.0)


CONFIDENCES: dict[str, ConfidenceFn] = {
    "max_softmax": max_softmax,
    "margin": margin,
    "entropy": entropy,
    "patience": patience,
}


def as_probabilities(
    exit_outputs: ArrayLike, *, from_logits: bool = False, name: str = "exit_probs"
) -> NDArray[np.float64]:
    """Validate per-exit outputs (n, L, C) and return probabilities in float64."""
    outputs = as_float_array(exit_outputs, name, ndim=3)  # (n, L, C)
    if from_logits:
        from scipy.special import softmax

        return softmax(outputs, axis=-1)
    check_probabilities(outputs, name)
    return outputs


def confidences(
    exit_probs: ArrayLike, *, measure: str | ConfidenceFn = "max_softmax"
) -> NDArray[np.float64]:
    """Confidence of every sample at every exit.

    Parameters
    ----------
    exit_probs : array of shape (n, L, C)
        Per-exit class probabilities.
    measure : {"max_softmax", "margin", "entropy", "patience"} or callable
        A callable gets the (n, L, C) probabilities and must return (n, L) values in [0, 1].

    Returns
    -------
    array of shape (n, L)
    """
    probs = as_probabilities(exit_probs)
    if callable(measure):
        fn = measure
        name = getattr(measure, "__name__", "custom")
    else:
        name = check_choice(measure, "measure", CONFIDENCES)
        fn = CONFIDENCES[name]
    scores = np.asarray(fn(probs), dtype=np.float64)
    if scores.shape != probs.shape[:2]:
        raise ValueError(
            f"confidence measure {name!r} must return shape {probs.shape[:2]}; got {scores.shape}."
        )
    if not np.all(np.isfinite(scores)) or scores.min() < -1e-9 or scores.max() > 1 + 1e-9:
        raise ValueError(f"confidence measure {name!r} must return values in [0, 1].")
    return np.clip(scores, 0.0, 1.0)
