"""Conditional value-at-risk (CVaR): the mean loss of the worst samples, certified.

A mean risk lets a few samples be ruined; an exceedance risk (:mod:`exitguard.risk.tail`)
counts how many lose more than a tolerance but not by how much. The **CVaR** at level
``beta`` is the mean loss over the worst ``1 - beta`` share of samples:

    CVaR_beta(F) = 1/(1 - beta) * integral from beta to 1 of F^-1(p) dp

("the worst 10% of generated images lose at most 0.05 SSIM on average" is
``CVaR_0.9(loss) <= 0.05``; ``beta = 0`` is the mean). It is not the mean of a per-sample
loss, so the bounds of :mod:`exitguard.risk.bounds` do not apply; this module bounds it as
Quantile Risk Control does (Snell, Zollo, Deng, Pitassi, Zemel, ICLR 2023):

1. A lower confidence band on the loss CDF, valid at every loss value at once: the one-sided
   Dvoretzky-Kiefer-Wolfowitz inequality with Massart's constant,
   ``P(sup_x F_n(x) - F(x) > w) <= exp(-2 n w^2)`` for ``exp(-2 n w^2) <= 1/2``, so
   ``F >= F_n - w`` everywhere with probability ``1 - delta`` for
   ``w = sqrt(log(1/delta) / (2 n))`` (``delta <= 1/2``; above that the two-sided constant,
   ``w = sqrt(log(2/delta) / (2 n))``).
2. ``F >= F_L`` pointwise makes the quantiles of ``F_L`` an upper bound on those of ``F``, and
   CVaR weights quantiles with a non-negative weight, so ``CVaR(F) <= CVaR(F_L)``. ``F_L``
   moves ``w`` of probability mass from the smallest losses to the loss bound ``B``.

So ``P(CVaR_beta(F) <= UCB) >= 1 - delta`` over the draw of ``n`` i.i.d. losses bounded above
by ``B``. Certifying a grid from the full model on, the rows are tested in the grid's order
and the selection is the end of the unbroken run of passing rows (fixed-sequence testing):
``P(CVaR of the selected row > epsilon) <= delta`` for calibration and test data
exchangeable, with no monotonicity assumed (as for the UCB procedures of
:mod:`exitguard.risk.procedures`).

The DKW band has the same width at every loss value, so it is conservative in the far tail:
the ``w`` of mass moved to ``B`` costs ``w / (1 - beta) * B`` in the worst case (at n = 1000,
delta = 0.1, beta = 0.9: up to 0.34 B). CVaR at high ``beta`` needs a large ``n``, a small
loss bound, or the exceedance risk instead.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from exitguard.risk._validation import as_float_array, check_loss_range, check_open_unit

Array = NDArray[np.float64]


def _check_beta(beta: Any) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float, np.floating)):
        raise TypeError(f"`beta` must be a float in [0, 1); got {beta!r}.")
    value = float(beta)
    if not (0.0 <= value < 1.0):
        raise ValueError(f"`beta` must lie in [0, 1) (0 is the mean); got {value!r}.")
    return value


def _checked(losses: ArrayLike, loss_bound: float) -> Array:
    table = as_float_array(losses, "losses", ndim=(1, 2))
    if table.shape[-1] == 0:
        raise ValueError("`losses` must hold at least one sample on its last axis; got 0.")
    bound = float(loss_bound)
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"`loss_bound` must be a finite float > 0; got {loss_bound!r}.")
    check_loss_range(table, bound)
    return table


def dkw_width(n: int, delta: ArrayLike) -> Array:
    """Width ``w`` of the one-sided DKW band: ``P(sup F_n - F > w) <= delta`` for ``n`` samples."""
    d = np.asarray(delta, dtype=np.float64)
    return np.where(
        d <= 0.5, np.sqrt(np.log(1.0 / d) / (2.0 * n)), np.sqrt(np.log(2.0 / d) / (2.0 * n))
    )


def _upper_tail_mean(values: Array, masses: Array, beta: float) -> Array:
    """CVaR of discrete distributions: atoms ``values`` (..., m) sorted ascending, ``masses``."""
    upper = np.cumsum(masses, axis=-1)  # (..., m) CDF at each atom
    lower = upper - masses  # (..., m) CDF just below each atom
    share = np.clip(np.minimum(upper, 1.0) - np.maximum(lower, beta), 0.0, None)  # (..., m)
    return np.sum(values * share, axis=-1) / (1.0 - beta)  # (...,)


def _shifted_cvar(ordered: Array, width: Array, *, beta: float, loss_bound: float) -> Array:
    """CVaR of the empirical distribution with ``width`` of mass moved to ``loss_bound``.

    ``ordered`` (..., n) sorted losses; ``width`` broadcasts against the leading axes plus one
    trailing axis of candidates, e.g. (..., M); returns (..., M).
    """
    n = ordered.shape[-1]
    cdf = np.arange(1, n + 1, dtype=np.float64) / n  # (n,) empirical CDF at each order stat
    lowered = np.clip(cdf - width[..., None], 0.0, None)  # (..., M, n) the band's lower edge
    masses = np.diff(lowered, axis=-1, prepend=0.0)  # (..., M, n)
    top = 1.0 - lowered[..., -1:]  # (..., M, 1) mass moved to the loss bound
    values = np.broadcast_to(ordered[..., None, :], masses.shape)  # (..., M, n)
    atoms = np.concatenate([values, np.full(top.shape, loss_bound)], axis=-1)  # (..., M, n+1)
    return _upper_tail_mean(atoms, np.concatenate([masses, top], axis=-1), beta)


def cvar(losses: ArrayLike, *, beta: float) -> Array:
    """Empirical CVaR at level ``beta`` along the last axis: (..., n) -> (...).

    The mean of the worst ``1 - beta`` share of the losses, a sample split at the boundary
    counting with its share (``beta = 0`` gives the mean; no guarantee).

    Examples
    --------
    >>> round(float(cvar([0.0, 0.1, 0.2, 0.3, 1.0], beta=0.6)), 6)  # the worst two, averaged
    0.65
    """
    table = as_float_array(losses, "losses", ndim=(1, 2))
    b = _check_beta(beta)
    ordered = np.sort(table, axis=-1)
    n = ordered.shape[-1]
    return _upper_tail_mean(ordered, np.full(ordered.shape, 1.0 / n), b)


def cvar_upper_bound(
    losses: ArrayLike, *, beta: float, delta: float, loss_bound: float = 1.0
) -> Array:
    """Upper confidence bound on CVaR at level ``beta``: (n,) -> () or (K, n) -> (K,).

    With probability at least ``1 - delta`` over ``n`` i.i.d. losses at most ``loss_bound``,
    the true CVaR of each row is at most its bound (see the module docstring).
    """
    table = _checked(losses, loss_bound)
    b, d = _check_beta(beta), check_open_unit(delta, "delta")
    width = dkw_width(table.shape[-1], d) * np.ones((*table.shape[:-1], 1))  # (..., 1)
    ordered = np.sort(table, axis=-1)
    return _shifted_cvar(ordered, width, beta=b, loss_bound=float(loss_bound))[..., 0]


def cvar_p_value(
    losses: ArrayLike, target_risk: float, *, beta: float, loss_bound: float = 1.0
) -> Array:
    """p-value of "CVaR at level ``beta`` >= ``target_risk``": (n,) -> () or (K, n) -> (K,).

    The smallest ``delta`` at which :func:`cvar_upper_bound` falls below ``target_risk``
    (found by bisection on the band's width, to 1e-12 of it, rounded up to stay valid);
    1 when even the empirical CVaR does not, and when that ``delta`` is above 1/2 (where only
    the two-sided constant holds). So ``p < delta`` certifies exactly when the bound does,
    up to that precision.
    """
    table = _checked(losses, loss_bound)
    b, eps = _check_beta(beta), float(target_risk)
    if not math.isfinite(eps):
        raise ValueError(f"`target_risk` must be finite; got {target_risk!r}.")
    ordered = np.sort(table, axis=-1)
    n = ordered.shape[-1]
    lead = table.shape[:-1]
    low, high = np.zeros(lead), np.full(lead, 1.0)  # the width, in [0, 1]
    below = _shifted_cvar(ordered, np.zeros((*lead, 1)), beta=b, loss_bound=float(loss_bound))
    fails = below[..., 0] >= eps  # not even at width 0
    # Bisection keeping the largest width known to pass (bounds._smallest_true keeps the
    # upper end of its bracket, which here would give a p-value slightly too small).
    for _ in range(45):  # 2^-45 < 1e-13
        middle = (low + high) / 2
        ok = (
            _shifted_cvar(ordered, middle[..., None], beta=b, loss_bound=float(loss_bound))[..., 0]
            < eps
        )
        low, high = np.where(ok, middle, low), np.where(ok, high, middle)
    p = np.exp(-2.0 * n * low**2)  # low never exceeds the crossing: p never too small
    return np.where(fails | (p > 0.5), 1.0, np.minimum(p, 1.0))


@dataclasses.dataclass(frozen=True)
class CVaRSelection:
    """Outcome of certifying CVaR along a grid of configurations.

    Attributes
    ----------
    index : int
        The selected row (0 = the full model, selected when nothing is certified).
    certified : bool
        Whether an early-exit row (index >= 1) passed.
    beta, target_risk, delta, loss_bound : float
        What was certified: ``CVaR_beta <= target_risk`` with probability ``1 - delta``.
    n : int
        Calibration samples.
    empirical_cvar, upper_bound : tuple of float (K,)
        Every row's empirical CVaR and its upper confidence bound.
    passed : tuple of bool (K,)
        Which rows have ``upper_bound < target_risk`` (row 0, the fallback, is not tested and
        counts as passed).
    """

    index: int
    certified: bool
    beta: float
    target_risk: float
    delta: float
    loss_bound: float
    n: int
    empirical_cvar: tuple[float, ...]
    upper_bound: tuple[float, ...]
    passed: tuple[bool, ...]

    def __repr__(self) -> str:
        outcome = f"row {self.index}" if self.certified else "nothing certified (full model)"
        return (
            f"CVaRSelection({outcome}: CVaR_{self.beta:g} <= {self.target_risk:g} w.p. "
            f">= {1 - self.delta:g}, bound {self.upper_bound[self.index]:.4g}, n={self.n}, "
            f"rows={len(self.passed)})"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CVaRSelection:
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = fields - set(data)
        if missing:
            raise ValueError(f"a CVaRSelection needs {sorted(missing)}; they are missing.")
        values = {k: data[k] for k in fields}
        for name in ("empirical_cvar", "upper_bound"):
            values[name] = tuple(float(x) for x in values[name])
        values["passed"] = tuple(bool(x) for x in values["passed"])
        return cls(**values)


def certify_cvar(
    losses: ArrayLike,
    *,
    beta: float,
    target_risk: float,
    delta: float = 0.1,
    loss_bound: float = 1.0,
) -> CVaRSelection:
    """The most aggressive row of a grid whose CVaR at level ``beta`` is certified.

    ``losses`` (K, n): row 0 the full model (loss-free), rows growing more aggressive, each
    loss relative to the full model and at most ``loss_bound``. Rows are tested from row 1 on;
    the selection is the end of the unbroken run of rows whose bound is below
    ``target_risk`` (row 0 when row 1 fails).

    Guarantee: for calibration and test samples exchangeable,
    ``P(CVaR_beta of the selected row > target_risk) <= delta`` over the calibration draw
    (fixed-sequence testing of level-``delta`` tests; no monotonicity needed).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> table = np.stack([np.zeros(2000), rng.uniform(0, 0.02, 2000), rng.uniform(0, 0.5, 2000)])
    >>> certify_cvar(table, beta=0.9, target_risk=0.2, loss_bound=0.5)
    CVaRSelection(row 1: CVaR_0.9 <= 0.2 w.p. >= 0.9, bound 0.1346, n=2000, rows=3)
    """
    table = _checked(losses, loss_bound)
    if table.ndim != 2 or table.shape[0] < 2:
        raise ValueError(
            f"`losses` must be a (K, n) table with K >= 2 rows (row 0 the full model); "
            f"got shape {table.shape}."
        )
    eps = float(target_risk)
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"`target_risk` must be a finite float > 0; got {target_risk!r}.")
    b, d = _check_beta(beta), check_open_unit(delta, "delta")
    upper = cvar_upper_bound(table, beta=b, delta=d, loss_bound=loss_bound)  # (K,)
    passed = upper < eps
    passed[0] = True  # the full model is the fallback, not tested
    failing = np.flatnonzero(~passed[1:])
    index = int(failing[0]) if failing.size else table.shape[0] - 1
    return CVaRSelection(
        index=index,
        certified=index >= 1,
        beta=b,
        target_risk=eps,
        delta=d,
        loss_bound=float(loss_bound),
        n=int(table.shape[1]),
        empirical_cvar=tuple(float(x) for x in cvar(table, beta=b)),
        upper_bound=tuple(float(x) for x in upper),
        passed=tuple(bool(x) for x in passed),
    )
