"""High-level calibration: loss tables or per-exit outputs in, :class:`ExitPolicy` out."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats

from exitguard.policy import ExitPolicy, fingerprint, guarantee_text
from exitguard.risk import procedures
from exitguard.risk._validation import (
    as_float_array,
    check_int,
    check_loss_range,
    check_open_unit,
    check_positive,
)
from exitguard.risk.confidence import ConfidenceFn, as_probabilities, confidences
from exitguard.risk.exits import as_threshold_grid, exit_indices
from exitguard.risk.losses import Risk, get_risk, loss_table, per_exit_losses

Array = NDArray[np.float64]


class RiskNotControlledWarning(UserWarning):
    """No early-exit policy could be certified; the full model is returned."""


class NonMonotoneRiskWarning(UserWarning):
    """The empirical risk drops far below an earlier row: monotonicity looks doubtful."""


def check_table(
    losses: ArrayLike,
    *,
    loss_bound: float,
    cost: ArrayLike | None = None,
    thresholds: ArrayLike | None = None,
) -> tuple[Array, Array | None, Array | None]:
    """Validate a loss table (K, n) with optional cost (K,) or (K, n) and thresholds (K,)."""
    bound = check_positive(loss_bound, "loss_bound")
    table = as_float_array(losses, "losses", ndim=2)  # (K, n)
    n_rows, n = table.shape
    check_int(n_rows, "losses.shape[0] (rows of the grid)", minimum=1)
    if n < 2:
        raise ValueError(f"`losses` must hold at least 2 calibration samples (columns); got {n}.")
    check_loss_range(table, bound)
    if np.any(table[0] != 0.0):
        raise ValueError(
            "`losses` row 0 must be loss-free (it is the full model, compared with itself); "
            f"got {int(np.count_nonzero(table[0]))} non-zero entries, max |loss| "
            f"{np.abs(table[0]).max():.4g}. Order rows from the full model to the most aggressive."
        )
    cost_array = None
    if cost is not None:
        cost_array = as_float_array(cost, "cost", ndim=(1, 2))
        if cost_array.shape not in ((n_rows,), (n_rows, n)):
            raise ValueError(
                f"`cost` must have shape ({n_rows},) or ({n_rows}, {n}) to match `losses`; "
                f"got {cost_array.shape}."
            )
    grid = None
    if thresholds is not None:
        grid = np.asarray(thresholds, dtype=np.float64)
        if grid.shape != (n_rows,):
            raise ValueError(
                f"`thresholds` must have shape ({n_rows},) to match `losses`; got {grid.shape}."
            )
        if np.isnan(grid).any() or np.any(np.diff(grid) >= 0):
            raise ValueError(
                "`thresholds` must be strictly decreasing (row 0 the full model); "
                f"got {np.array2string(grid[:5], precision=3)}..."
            )
    return table, cost_array, grid


def monotonicity_violation(losses: Array, *, level: float = 0.01) -> tuple[int, float] | None:
    """The row whose empirical risk falls most significantly below an earlier row, if any.

    For every row k, the earlier row j with the highest empirical risk is compared with k by
    a one-sided paired z-test; a violation is reported when the largest z exceeds the
    Bonferroni-corrected normal quantile at ``level``. Returns (row, z) or None.
    """
    n_rows, n = losses.shape
    if n_rows < 3:
        return None
    means = losses.mean(axis=1)  # (K,)
    earlier = np.maximum.accumulate(means)[:-1]  # (K-1,) max over rows < k
    # First row attaining the running maximum (what argmax over rows <= k returns), vectorised.
    rows = np.arange(n_rows)
    new_peak = means > np.concatenate([[-np.inf], np.maximum.accumulate(means)[:-1]])  # (K,)
    best = np.maximum.accumulate(np.where(new_peak, rows, 0))[:-1]  # (K-1,)
    diff = losses[best] - losses[1:]  # (K-1, n), earlier peak minus row k
    spread = diff.std(axis=1, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(spread > 0, (earlier - means[1:]) / (spread / math.sqrt(n)), 0.0)
    critical = stats.norm.isf(level / (n_rows - 1))
    worst = int(np.argmax(z))
    if z[worst] > critical:
        return worst + 1, float(z[worst])
    return None


def _expected_cost(cost: Array | None, index: int) -> float | None:
    if cost is None:
        return None
    return float(cost[index].mean()) if cost.ndim == 2 else float(cost[index])


def calibrate_table(
    losses: ArrayLike,
    *,
    target_risk: float,
    delta: float = 0.1,
    procedure: str = "ucb-wsr",
    loss_bound: float = 1.0,
    cost: ArrayLike | None = None,
    thresholds: ArrayLike | None = None,
    bet_cap: float | None = None,
    risk: str | None = None,
    confidence: str | None = None,
) -> ExitPolicy:
    """Pick the most aggressive row of a loss table whose risk is controlled.

    Parameters
    ----------
    losses : array of shape (K, n)
        ``losses[k, i]``: loss of calibration sample ``i`` under candidate policy ``k``,
        relative to the full model, in ``[-loss_bound, loss_bound]``. Row 0 is the full model
        and must be loss-free; rows grow more aggressive.
    target_risk : float in (0, 1)
        Epsilon, the tolerated risk.
    delta : float in (0, 1)
        For high-probability procedures, the allowed probability of a violation.
    procedure : str
        One of ``naive, crc, ucb-hoeffding, ucb-hb, ucb-wsr, ucb-binomial, ltt,
        ltt-bonferroni`` (``"ucb"`` means ``"ucb-wsr"``).
    loss_bound : float
        B (1 for 0-1 losses, 2 for Brier summed over classes).
    cost : array of shape (K,) or (K, n), optional
        Compute per row (e.g. mean exit layer or FLOPs), used for ``expected_cost``.
    thresholds : array of shape (K,), optional
        The threshold of each row (row 0 usually ``inf``).
    bet_cap : float, optional
        Cap on the WSR bets; default ``1 / loss_bound`` (the paper's Remark 1);
        ``1 / (2 * loss_bound)`` is the paper's Prop. 3.
    risk, confidence : str, optional
        Names recorded in the policy.

    Returns
    -------
    ExitPolicy

    Warns
    -----
    RiskNotControlledWarning
        When a procedure with a guarantee certifies no early-exit row (the full model is
        returned with ``certified=False``).
    NonMonotoneRiskWarning
        For naive and crc, when the empirical risk is far from monotone along the grid.

    Notes
    -----
    * naive: no guarantee.
    * crc: ``E[R] <= target_risk`` over calibration draws; needs i.i.d. (exchangeable) data
      and a risk monotone along the grid (marginal monotonicity of the network).
    * ucb-* and ltt*: ``P(R <= target_risk) >= 1 - delta`` over calibration draws; need
      i.i.d. data. See :mod:`exitguard.risk.procedures`.

    References
    ----------
    Jazbec, Timans et al., "Fast yet Safe: Early-Exiting with Risk Control", NeurIPS 2024.

    Examples
    --------
    >>> import numpy as np
    >>> losses = np.zeros((3, 200)); losses[2, :40] = 1.0
    >>> policy = calibrate_table(losses, target_risk=0.1, procedure="crc")
    >>> policy.index, policy.certified
    (1, True)
    """
    name = procedures.canonical_procedure(procedure)
    epsilon = check_open_unit(target_risk, "target_risk")
    level = check_open_unit(delta, "delta")
    table, cost_array, grid = check_table(
        losses, loss_bound=loss_bound, cost=cost, thresholds=thresholds
    )
    bound = float(loss_bound)
    if bet_cap is not None:
        check_positive(bet_cap, "bet_cap")
    if name in ("naive", "crc"):
        violation = monotonicity_violation(table)
        if violation is not None:
            row, z = violation
            warnings.warn(
                f"the empirical risk at row {row} is far below an earlier row (z = {z:.1f}): "
                f"the risk does not look monotone along the grid, which {name!r} assumes. "
                "Use procedure='ltt' (fixed-sequence testing), which does not need it.",
                NonMonotoneRiskWarning,
                stacklevel=2,
            )
    selection = procedures.run(
        table, target_risk=epsilon, delta=level, procedure=name, loss_bound=bound, bet_cap=bet_cap
    )
    index = selection.index
    if not selection.certified and procedures.has_guarantee(name):
        warnings.warn(
            f"no early-exit policy could be certified by {name!r} at target_risk={epsilon:g}, "
            f"delta={level:g} with n={table.shape[1]} samples: using the full model. "
            "More calibration data or a larger target risk may help.",
            RiskNotControlledWarning,
            stacklevel=2,
        )
    upper = None
    p_value = None
    if selection.upper_bound is not None:
        upper = float(selection.upper_bound[index])
    elif name == "crc":
        upper = float(selection.statistic[index])
    if name.startswith("ltt"):
        p_value = float(selection.statistic[index])
    if grid is not None:
        threshold: float | None = float(grid[index])
    else:
        threshold = math.inf if index == 0 else None
    full_cost = _expected_cost(cost_array, 0)
    return ExitPolicy(
        threshold=threshold,
        index=index,
        procedure=name,
        guarantee=guarantee_text(name, epsilon, level),
        target_risk=epsilon,
        delta=level,
        n=int(table.shape[1]),
        empirical_risk=float(selection.empirical_risk[index]),
        upper_bound=upper,
        p_value=p_value,
        expected_cost=_expected_cost(cost_array, index),
        full_cost=full_cost,
        certified=selection.certified,
        loss_bound=bound,
        risk=risk,
        confidence=confidence,
        data_fingerprint=fingerprint(table),
    )


def build_table(
    exit_probs: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    risk: str | Risk = "prediction_gap",
    confidence: str | ConfidenceFn = "max_softmax",
    thresholds: ArrayLike | None = None,
    exit_cost: ArrayLike | None = None,
    from_logits: bool = False,
    consistency_label: str = "sample",
    clip: bool = False,
    rng: np.random.Generator | int | None = None,
) -> dict[str, Array]:
    """Loss and cost tables from per-exit outputs, by one vectorised pass over the grid.

    Returns a dict with ``losses`` (K, n), ``cost`` (K, n) (``exit_cost`` of the exit taken;
    by default the 1-based exit number, i.e. exits evaluated), ``thresholds`` (K,) and
    ``exits`` (K, n).
    """
    probs = as_probabilities(exit_probs, from_logits=from_logits)  # (n, L, C)
    scores = confidences(probs, measure=confidence)  # (n, L)
    grid = as_threshold_grid(thresholds)  # (K,)
    exits = exit_indices(scores, grid)  # (K, n)
    chosen = get_risk(risk, consistency_label=consistency_label, rng=rng)
    table = loss_table(per_exit_losses(probs, labels, chosen), exits, clip=clip)  # (K, n)
    n_exits = probs.shape[1]
    if exit_cost is None:
        per_exit_cost = np.arange(1, n_exits + 1, dtype=np.float64)
    else:
        per_exit_cost = as_float_array(exit_cost, "exit_cost", ndim=1)
        if per_exit_cost.shape != (n_exits,):
            raise ValueError(
                f"`exit_cost` must have shape ({n_exits},), one value per exit; "
                f"got {per_exit_cost.shape}."
            )
    return {"losses": table, "cost": per_exit_cost[exits], "thresholds": grid, "exits": exits}


def calibrate(
    exit_probs: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    risk: str | Risk = "prediction_gap",
    target_risk: float,
    delta: float = 0.1,
    procedure: str = "ucb-wsr",
    confidence: str | ConfidenceFn = "max_softmax",
    thresholds: ArrayLike | None = None,
    exit_cost: ArrayLike | None = None,
    from_logits: bool = False,
    consistency_label: str = "sample",
    clip: bool = False,
    bet_cap: float | None = None,
    rng: np.random.Generator | int | None = None,
) -> ExitPolicy:
    """Calibrate an exit threshold from per-exit outputs of an early-exit network.

    Parameters
    ----------
    exit_probs : array of shape (n, L, C)
        Per-exit class probabilities (or logits with ``from_logits=True``) of ``n``
        calibration samples; the last exit is the full model.
    labels : int array of shape (n,), optional
        Ground truth; required for the gap risks.
    risk : str or Risk
        ``prediction_gap`` (0-1, B = 1), ``prediction_consistency`` (0-1, B = 1),
        ``distribution_gap`` (Brier, B = 2), ``distribution_consistency`` (Brier, B = 2),
        or a custom :class:`~exitguard.risk.losses.Risk`.
    target_risk, delta, procedure, bet_cap
        As in :func:`calibrate_table`.
    confidence : str or callable
        ``max_softmax``, ``margin``, ``entropy``, ``patience`` or (n, L, C) -> (n, L).
    thresholds : array, optional
        Candidate thresholds, decreasing; the default grid is ``inf, 1.00, 0.99, ..., 0.00``.
    exit_cost : array of shape (L,), optional
        Cost of stopping at each exit (e.g. cumulative FLOPs); default: exits evaluated.
    consistency_label : {"sample", "argmax"}
        Pseudo-label of ``distribution_consistency``: sampled from the full model (the
        paper) or its argmax.
    clip : bool
        Clip negative losses to 0 (the paper's Eq. 16); off by default.
    rng : numpy Generator or int, optional
        Seeds the pseudo-label draws of ``distribution_consistency``.

    Returns
    -------
    ExitPolicy
        Its guarantee is the one of :func:`calibrate_table` for the chosen risk.
    """
    chosen = get_risk(risk, consistency_label=consistency_label, rng=rng)
    tables = build_table(
        exit_probs,
        labels,
        risk=chosen,
        confidence=confidence,
        thresholds=thresholds,
        exit_cost=exit_cost,
        from_logits=from_logits,
        clip=clip,
    )
    policy = calibrate_table(
        tables["losses"],
        target_risk=target_risk,
        delta=delta,
        procedure=procedure,
        loss_bound=chosen.loss_bound,
        cost=tables["cost"],
        thresholds=tables["thresholds"],
        bet_cap=bet_cap,
        risk=chosen.name,
        confidence=confidence if isinstance(confidence, str) else None,
    )
    return policy.with_model(n_exits=int(np.shape(exit_probs)[1]), confidence=policy.confidence)


def as_procedure_list(values: str | Sequence[str]) -> list[str]:
    items = [values] if isinstance(values, str) else list(values)
    if not items:
        raise ValueError("`procedures` must name at least one procedure; got an empty list.")
    return [procedures.canonical_procedure(p) for p in items]
