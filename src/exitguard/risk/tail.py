"""Tail risks: how often a continuous per-sample loss exceeds a tolerance.

A mean risk promises little about the bad tail: "the SSIM drops by 0.01 on average" allows a
few images to be ruined. An **exceedance risk** bounds the share of samples whose loss
(relative to the full model) exceeds a tolerance ``t``:

    R_t(configuration) = P(loss > t)        the mean of the 0-1 loss 1[loss > t]

so "at most 5% of generated images lose more than 0.1 SSIM" is ``P(loss > 0.1) <= 0.05``.
Being the mean of a 0-1 loss (B = 1), it is controlled by every procedure and bound of
:mod:`exitguard.risk.procedures` (the exact binomial bound included), alone or beside a mean
risk in Pareto Testing (:mod:`exitguard.risk.pareto`). Equivalently, it certifies that the
``(1 - epsilon)``-quantile of the loss is at most ``t`` (a value-at-risk statement; Snell et
al., "Quantile Risk Control", ICLR 2023).

The tolerance must be ``>= 0``: the full model's loss relative to itself is 0, never above
``t``, so the full model keeps an exceedance risk of 0 and remains the safe fallback.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

from exitguard.risk._validation import as_float_array

Array = NDArray[np.float64]


def _check_tolerance(tolerance: float) -> float:
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float, np.floating)):
        raise TypeError(f"`tolerance` must be a float >= 0; got {tolerance!r}.")
    value = float(tolerance)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(
            "`tolerance` must be a finite float >= 0 (the full model's relative loss is 0 and "
            f"must not exceed it); got {value!r}."
        )
    return value


def exceedance_losses(losses: ArrayLike, tolerance: float) -> Array:
    """The exceedance table of a loss table: ``1[loss > tolerance]``, same shape, B = 1.

    ``losses`` is any table of losses relative to the full model (``(K, n)`` for a grid,
    ``(R, K, n)`` for several risks); row 0 of a grid stays loss-free since ``tolerance >= 0``.

    Examples
    --------
    >>> exceedance_losses([[0.0, 0.0], [0.05, 0.3]], 0.1)
    array([[0., 0.],
           [0., 1.]])
    """
    table = as_float_array(losses, "losses", ndim=(1, 2, 3))
    return (table > _check_tolerance(tolerance)).astype(np.float64)


def exceedance_per_exit(per_exit_losses: ArrayLike, tolerance: float) -> Array:
    """Per-exit absolute losses of the exceedance risk; (..., n, L) -> (..., n, L) in {0, 1}.

    Entry ``[i, l]`` is ``1[per_exit[i, l] - per_exit[i, L-1] > tolerance]``: whether leaving
    at exit ``l`` loses more than ``tolerance`` against the full model. The last exit's entry
    is 0, so the loss of a configuration (this table at the exit taken minus at the last exit,
    as :func:`exitguard.risk.configurations.evaluate_vectors` computes it) is exactly the
    exceedance indicator of the configuration's relative loss. Pass it with loss bound 1.
    """
    table = as_float_array(per_exit_losses, "per_exit_losses", ndim=(2, 3))
    relative = table - table[..., -1:]  # (..., n, L)
    return (relative > _check_tolerance(tolerance)).astype(np.float64)
