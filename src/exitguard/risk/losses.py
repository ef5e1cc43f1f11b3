"""Per-sample losses relative to the full model, and loss tables over a threshold grid.

The paper's four risks (Jazbec et al., 2024, Section 3.2) are available by name:

==========================  =================================================  =====
name                        loss of exit ``e`` for one sample                   B
==========================  =================================================  =====
prediction_gap              1[argmax p_e != y] - 1[argmax p_L != y]             1
prediction_consistency      1[argmax p_e != argmax p_L]                         1
distribution_gap            brier(p_e, y) - brier(p_L, y)                       2
distribution_consistency    brier(p_e, y~) - brier(p_L, y~),  y~ from p_L       2
==========================  =================================================  =====

``brier(p, y) = sum_c (p_c - 1[y = c])^2`` is summed over classes, so it lies in [0, 2].
All losses are signed (negative where the early exit does better than the full model) and lie
in [-B, B]; they are never clipped unless ``clip=True`` is asked for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike, NDArray

from exitguard.risk._validation import (
    as_float_array,
    check_choice,
    check_class_indices,
    check_labels,
    check_positive,
)

PerExitLoss = Callable[[NDArray[np.float64], "NDArray[np.int64] | None"], NDArray[np.float64]]
"""(probs (n, L, C), labels (n,) or None) -> loss of every exit (n, L), each in [0, B]."""

PredictionLoss = Callable[[NDArray[np.int64], "NDArray[np.int64] | None"], NDArray[np.float64]]
"""(predictions (n, L), labels (n,) or None) -> loss of every exit (n, L), each in [0, B]."""

CONSISTENCY_LABELS = ("sample", "argmax")


@dataclasses.dataclass(frozen=True)
class Risk:
    """A risk: how to score each exit of each sample, and the loss bound B.

    Parameters
    ----------
    name : str
    per_exit_loss : callable
        ``(probs (n, L, C), labels (n,) or None) -> (n, L)`` absolute losses in [0, B]. The
        table entry is the loss at the exit taken minus the loss of the last exit.
    loss_bound : float
        B; absolute losses must lie in [0, B], so relative losses lie in [-B, B].
    needs_labels : bool
        True for performance-gap risks (compared with the ground truth).
    binary : bool
        True when absolute losses are 0 or 1 (enables the exact binomial bound).
    prediction_loss : callable, optional
        ``(predictions (n, L), labels (n,) or None) -> (n, L)``: the same losses from the
        predicted classes alone, for outputs saved as confidences and predictions (no
        probabilities). None for risks that need the distributions (Brier).
    """

    name: str
    per_exit_loss: PerExitLoss
    loss_bound: float
    needs_labels: bool
    binary: bool = False
    prediction_loss: PredictionLoss | None = None


def _zero_one(probs: NDArray[np.float64], labels: NDArray[np.int64]) -> NDArray[np.float64]:
    return _wrong(probs.argmax(axis=-1), labels)


def _wrong(predictions: NDArray[np.int64], labels: NDArray[np.int64]) -> NDArray[np.float64]:
    """1 where an exit's predicted class differs from the label: (n, L), (n,) -> (n, L)."""
    return (predictions != labels[:, None]).astype(np.float64)


def _prediction_gap_from_predictions(
    predictions: NDArray[np.int64], labels: NDArray[np.int64] | None
) -> NDArray[np.float64]:
    return _wrong(predictions, _require(labels))


def _prediction_consistency_from_predictions(
    predictions: NDArray[np.int64], labels: NDArray[np.int64] | None
) -> NDArray[np.float64]:
    return _wrong(predictions, predictions[:, -1])


def _brier(probs: NDArray[np.float64], labels: NDArray[np.int64]) -> NDArray[np.float64]:
    """Brier loss of every exit, summed over classes: (n, L, C), (n,) -> (n, L)."""
    squared = np.square(probs).sum(axis=-1)  # (n, L)
    at_label = np.take_along_axis(probs, labels[:, None, None], axis=-1)[..., 0]  # (n, L)
    return np.clip(squared - 2.0 * at_label + 1.0, 0.0, 2.0)


def _prediction_gap(
    probs: NDArray[np.float64], labels: NDArray[np.int64] | None
) -> NDArray[np.float64]:
    return _zero_one(probs, _require(labels))


def _prediction_consistency(
    probs: NDArray[np.float64], labels: NDArray[np.int64] | None
) -> NDArray[np.float64]:
    return _zero_one(probs, probs[:, -1].argmax(axis=-1))


def _distribution_gap(
    probs: NDArray[np.float64], labels: NDArray[np.int64] | None
) -> NDArray[np.float64]:
    return _brier(probs, _require(labels))


def _require(labels: NDArray[np.int64] | None) -> NDArray[np.int64]:
    if labels is None:
        raise ValueError("this risk compares with the ground truth: `labels` are required.")
    return labels


def sample_full_model_labels(
    probs: NDArray[np.float64], rng: np.random.Generator
) -> NDArray[np.int64]:
    """Draw one pseudo-label per sample from the last exit's distribution; (n, L, C) -> (n,)."""
    last = probs[:, -1]  # (n, C)
    cumulative = np.cumsum(last, axis=-1)  # (n, C)
    uniform = rng.random(len(last)) * cumulative[:, -1]  # (n,)
    labels = (cumulative <= uniform[:, None]).sum(axis=-1)  # (n,)
    return np.minimum(labels, last.shape[-1] - 1).astype(np.int64)


def distribution_consistency_loss(
    *, label: str = "sample", rng: np.random.Generator | int | None = None
) -> PerExitLoss:
    """Brier loss against a pseudo-label from the full model.

    ``label="sample"`` draws the pseudo-label from the last exit's distribution, as the
    paper prescribes (seeded by ``rng``); ``label="argmax"`` uses the last exit's top class,
    as the paper's ImageNet code does.
    """
    check_choice(label, "consistency_label", CONSISTENCY_LABELS)
    generator = np.random.default_rng(rng)

    def loss(probs: NDArray[np.float64], labels: NDArray[np.int64] | None) -> NDArray[np.float64]:
        if label == "argmax":
            pseudo = probs[:, -1].argmax(axis=-1)
        else:
            pseudo = sample_full_model_labels(probs, generator)
        return _brier(probs, pseudo)

    return loss


RISKS = ("prediction_gap", "prediction_consistency", "distribution_gap", "distribution_consistency")


def get_risk(
    risk: str | Risk,
    *,
    consistency_label: str = "sample",
    rng: np.random.Generator | int | None = None,
) -> Risk:
    """The :class:`Risk` for a name (see the module docstring), or ``risk`` itself."""
    if isinstance(risk, Risk):
        return risk
    name = check_choice(risk, "risk", RISKS)
    if name == "prediction_gap":
        return Risk(
            name,
            _prediction_gap,
            1.0,
            needs_labels=True,
            binary=True,
            prediction_loss=_prediction_gap_from_predictions,
        )
    if name == "prediction_consistency":
        return Risk(
            name,
            _prediction_consistency,
            1.0,
            needs_labels=False,
            binary=True,
            prediction_loss=_prediction_consistency_from_predictions,
        )
    if name == "distribution_gap":
        return Risk(name, _distribution_gap, 2.0, needs_labels=True)
    loss = distribution_consistency_loss(label=consistency_label, rng=rng)
    return Risk(name, loss, 2.0, needs_labels=False)


def per_exit_losses(
    exit_probs: NDArray[np.float64], labels: ArrayLike | None, risk: Risk
) -> NDArray[np.float64]:
    """Absolute loss of every exit for every sample, checked against the risk's bound; (n, L)."""
    n, _, n_classes = exit_probs.shape
    checked = None
    if labels is not None:
        checked = check_labels(labels, "labels", n=n, n_classes=n_classes)
    elif risk.needs_labels:
        raise ValueError(
            f"risk {risk.name!r} compares with the ground truth: `labels` are required."
        )
    losses = as_float_array(risk.per_exit_loss(exit_probs, checked), f"{risk.name} losses", ndim=2)
    if losses.shape != exit_probs.shape[:2]:
        raise ValueError(
            f"risk {risk.name!r} must return per-exit losses of shape {exit_probs.shape[:2]}; "
            f"got {losses.shape}."
        )
    bound = check_positive(risk.loss_bound, "loss_bound")
    if losses.min() < -1e-12 or losses.max() > bound + 1e-12:
        raise ValueError(
            f"risk {risk.name!r} must return absolute losses in [0, loss_bound] = [0, {bound:g}]; "
            f"got values in [{losses.min():.6g}, {losses.max():.6g}]."
        )
    return losses


PREDICTION_RISKS = ("prediction_gap", "prediction_consistency")


def per_exit_prediction_losses(
    predictions: ArrayLike,
    labels: ArrayLike | None,
    risk: Risk,
    *,
    n_classes: int | None = None,
) -> NDArray[np.float64]:
    """Absolute loss of every exit from saved predicted classes; (n, L) -> (n, L).

    For outputs saved as a confidence and a predicted class per exit (no probabilities): only
    risks with a ``prediction_loss`` (the 0-1 risks) can be computed; Brier risks need the
    distributions and are refused.
    """
    if risk.prediction_loss is None:
        raise ValueError(
            f"risk {risk.name!r} needs per-exit class probabilities; outputs saved as "
            "confidences and predictions support only "
            f"{' and '.join(repr(r) for r in PREDICTION_RISKS)}."
        )
    raw = np.asarray(predictions)
    if raw.ndim != 2 or raw.shape[1] < 1:
        raise ValueError(f"`predictions` must be 2-D (n, L); got shape {raw.shape}.")
    n = raw.shape[0]
    checked = check_class_indices(raw, "predictions", shape=raw.shape, n_classes=n_classes)
    truth = None
    if labels is not None:
        truth = check_class_indices(labels, "labels", shape=(n,), n_classes=n_classes)
    elif risk.needs_labels:
        raise ValueError(
            f"risk {risk.name!r} compares with the ground truth: `labels` are required "
            "(or use 'prediction_consistency', which needs none)."
        )
    return as_float_array(risk.prediction_loss(checked, truth), f"{risk.name} losses", ndim=2)


def loss_table(per_exit: ArrayLike, exits: ArrayLike, *, clip: bool = False) -> NDArray[np.float64]:
    """Relative loss of every sample under every grid row.

    Parameters
    ----------
    per_exit : array of shape (n, L)
        Absolute loss of each exit (see :func:`per_exit_losses`).
    exits : int array of shape (K, n)
        Exit of each sample under each row (see :func:`exitguard.risk.exits.exit_indices`).
    clip : bool
        Replace negative losses by 0 (the paper's Eq. 16). Clipping makes control more
        conservative and is off by default.

    Returns
    -------
    array of shape (K, n)
        ``per_exit[i, exits[k, i]] - per_exit[i, L - 1]``.
    """
    absolute = as_float_array(per_exit, "per_exit", ndim=2)  # (n, L)
    rows = np.asarray(exits, dtype=np.int64)  # (K, n)
    if rows.ndim != 2 or rows.shape[1] != absolute.shape[0]:
        raise ValueError(f"`exits` must have shape (K, {absolute.shape[0]}); got {rows.shape}.")
    taken = np.take_along_axis(absolute.T, rows, axis=0)  # (K, n)
    table = taken - absolute[:, -1][None, :]  # (K, n)
    return np.maximum(table, 0.0) if clip else table
