"""High-level calibration: loss tables or per-exit outputs in, :class:`ExitPolicy` out."""

from __future__ import annotations

import dataclasses
import math
import statistics
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from exitguard._memory import check_memory
from exitguard.policy import ExitPolicy, fingerprint
from exitguard.risk import procedures
from exitguard.risk._validation import (
    as_float_array,
    check_choice,
    check_exit_cost,
    check_int,
    check_loss_range,
    check_open_unit,
    check_positive,
    check_unit_scores,
)
from exitguard.risk.confidence import CONFIDENCES, ConfidenceFn, as_probabilities, confidences
from exitguard.risk.exits import as_threshold_grid, check_threshold_grid, exit_indices
from exitguard.risk.losses import (
    Risk,
    get_risk,
    loss_table,
    per_exit_losses,
    per_exit_prediction_losses,
)

Array = NDArray[np.float64]


class RiskNotControlledWarning(UserWarning):
    """No early-exit policy could be certified; the full model is returned."""


class CertifiedAboveTargetWarning(UserWarning):
    """A certified row whose own calibration risk is above the target risk (legal, rare)."""


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
        if cost_array.min() < 0:
            raise ValueError(
                f"`cost` must be >= 0 (compute spent per sample); got a minimum of "
                f"{cost_array.min():g}."
            )
    grid = None
    if thresholds is not None:
        grid = as_float_array(thresholds, "thresholds", ndim=1, finite=False)
        if grid.shape != (n_rows,):
            raise ValueError(
                f"`thresholds` must have shape ({n_rows},) to match `losses`; got {grid.shape}."
            )
        check_threshold_grid(grid)
    return table, cost_array, grid


@dataclasses.dataclass(frozen=True)
class MonotonicityCheck:
    """Evidence that the risk falls along the grid (see :func:`monotonicity_check`).

    Attributes
    ----------
    earlier, later : int
        The pair of rows (earlier < later) whose empirical risk falls most significantly.
    z : float
        Studentised drop ``sqrt(n) (mean[earlier] - mean[later]) / sd`` of that pair.
    p_value : float
        Multiplier-bootstrap p-value of the largest studentised drop over all pairs of rows,
        under the least favourable monotone risk (all rows equal).
    drop : float
        ``mean[earlier] - mean[later]``.
    """

    earlier: int
    later: int
    z: float
    p_value: float
    drop: float


_CHECK_COLUMNS = 5000  # samples read by the monotonicity check (a random subset beyond that)
_CHECK_DRAWS = 500  # bootstrap draws
_CHECK_ELEMENTS = 2_000_000  # bootstrap draws x K x K held at once


def monotonicity_check(
    losses: ArrayLike, *, seed: int = 0, min_z: float = -math.inf
) -> MonotonicityCheck | None:
    """Test whether the risk is monotone (non-decreasing) along the grid.

    The statistic is the largest studentised drop ``sqrt(n) (mean_j - mean_k) / sd_jk`` over
    all pairs of rows ``j < k`` (``sd_jk`` the standard deviation of the paired differences);
    its null distribution under the least favourable monotone risk (all rows equal) comes from
    a Gaussian multiplier bootstrap, which accounts for the strong correlation between the
    rows of a grid (Chernozhukov, Chetverikov and Kato, 2019, "Inference on causal and
    structural parameters using many moment inequalities"). Tables wider than 5000 samples are
    checked on a seeded random subset of 5000.

    Returns None for tables with fewer than 3 rows or no pair of distinct rows, and when the
    largest studentised drop is below ``min_z`` (no bootstrap is run then).
    """
    table = as_float_array(losses, "losses", ndim=2)  # (K, n)
    n_rows, n = table.shape
    if n_rows < 3 or n < 2:
        return None
    rng = np.random.default_rng(seed)
    if n > _CHECK_COLUMNS:
        table = table[:, np.sort(rng.choice(n, _CHECK_COLUMNS, replace=False))]
        n = _CHECK_COLUMNS
    means = table.mean(axis=1)  # (K,)
    centred = table - means[:, None]  # (K, n)
    cov = centred @ centred.T / (n - 1)  # (K, K)
    var = np.diag(cov)
    pair_sd = np.sqrt(np.clip(var[:, None] + var[None, :] - 2.0 * cov, 0.0, None))  # (K, K)
    valid = np.triu(pair_sd > 1e-12, k=1)  # pairs j < k that differ
    if not valid.any():
        return None
    scale = np.where(valid, pair_sd, 1.0)

    def largest(centred_means: Array) -> Array:
        """Largest studentised drop over valid pairs; (..., K) -> (...,)."""
        drops = (centred_means[..., :, None] - centred_means[..., None, :]) / scale
        return np.where(valid, drops, -np.inf).max(axis=(-2, -1))

    z = np.where(valid, math.sqrt(n) * (means[:, None] - means[None, :]) / scale, -np.inf)
    earlier, later = np.unravel_index(int(np.argmax(z)), z.shape)
    observed = float(z[earlier, later])
    if observed < min_z:
        return None
    exceed = 0
    chunk = max(1, _CHECK_ELEMENTS // (n_rows * n_rows))
    # Bootstrap draws in chunks to bound memory at chunk x K x K.
    for start in range(0, _CHECK_DRAWS, chunk):
        size = min(chunk, _CHECK_DRAWS - start)
        weights = rng.standard_normal((size, n))  # (b, n)
        draws = weights @ centred.T / math.sqrt(n)  # (b, K)
        exceed += int(np.sum(largest(draws) >= observed))
    return MonotonicityCheck(
        earlier=int(earlier),
        later=int(later),
        z=observed,
        p_value=(1 + exceed) / (1 + _CHECK_DRAWS),
        drop=float(means[earlier] - means[later]),
    )


def _skipped_rows(passed: NDArray[np.bool_], index: int) -> NDArray[np.int64]:
    """Rows before the selected one that fail the test (the selection jumped over them)."""
    return np.flatnonzero(~passed[1:index]) + 1


def _warn_non_monotone(
    table: Array, selection: procedures.Selection, name: str, *, level: float = 0.01
) -> None:
    skipped = _skipped_rows(selection.passed, selection.index)
    check = None
    if procedures.get_procedure(name).needs_monotone_risk:
        # The bootstrap only runs where a drop could be significant: the largest studentised
        # drop over many pairs must at least exceed the one-pair critical value.
        check = monotonicity_check(table, min_z=statistics.NormalDist().inv_cdf(1 - level))
    significant = check is not None and check.p_value <= level
    if skipped.size == 0 and not significant:
        return
    parts = []
    if skipped.size:
        parts.append(
            f"row {selection.index} was selected although {skipped.size} earlier row(s) fail "
            f"the test (first: row {skipped[0]})"
        )
    if check is not None:
        parts.append(
            f"the empirical risk falls by {check.drop:.4g} from row {check.earlier} to row "
            f"{check.later} (z = {check.z:.2f}, bootstrap p = {check.p_value:.3g})"
        )
    assumes = (
        "assumes a risk monotone along the grid"
        if procedures.get_procedure(name).needs_monotone_risk
        else "carries no guarantee"
    )
    warnings.warn(
        f"the risk does not look monotone along the grid: {'; '.join(parts)}. {name!r} "
        f"{assumes}; procedure='crc' (monotonised losses) and the UCB/LTT procedures "
        "(fixed-sequence testing, e.g. procedure='ltt') do not need it.",
        NonMonotoneRiskWarning,
        stacklevel=3,
    )


ORDERS = ("random", "given")


def order_seed(seed: int | None) -> int:
    """A seed for the reading order: ``seed`` checked, or fresh entropy (53 bits) when None."""
    if seed is None:
        return int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> np.uint64(11))
    return check_int(seed, "seed", minimum=0)


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
    order: str = "random",
    seed: int | None = None,
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
    procedure : str or Procedure
        One of ``naive, crc, crc-marginal, ucb-hoeffding, ucb-hb, ucb-wsr, ucb-binomial, ltt,
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
    order : {"random", "given"}
        How an order-dependent bound (``ucb-wsr``) reads the samples: ``"random"`` (default)
        in a seeded uniformly random permutation, so the guarantee holds for exchangeable data
        in any file order (sorted by class, date or difficulty included); ``"given"`` in the
        order of the columns, valid only when that order is itself random (e.g. to compare
        with other code). Procedures that depend only on row means ignore it.
    seed : int, optional
        Seed of the permutation; default: fresh entropy, which is what the guarantee for any
        file order needs (the permutation must be drawn independently of the data). The seed
        used is recorded in the policy (``order_seed``), so the calibration can be repeated
        exactly. A fixed seed chosen in advance is valid when the file order is itself random;
        a seed chosen after looking at outcomes voids the guarantee.

    Returns
    -------
    ExitPolicy

    Warns
    -----
    RiskNotControlledWarning
        When a procedure with a guarantee certifies no early-exit row (the full model is
        returned with ``certified=False``).
    NonMonotoneRiskWarning
        For naive and crc-marginal, when the selection jumps over rows that fail the test or
        the risk falls significantly along the grid (see :func:`monotonicity_check`).

    Notes
    -----
    All guarantees are over the draw of the calibration set (and of the reading order), for
    calibration and test data that are exchangeable (e.g. i.i.d.):

    * naive: no guarantee.
    * crc: ``E[R] <= target_risk``, on per-sample monotonised losses (each sample's loss at a
      row replaced by its maximum over the rows before it), with no further assumption.
    * crc-marginal: ``E[R] <= target_risk`` if the risk is monotone along the grid (marginal
      monotonicity of the network), which cannot be checked from the data; a
      :class:`NonMonotoneRiskWarning` reports evidence against it.
    * ucb-* and ltt*: ``P(R <= target_risk) >= 1 - delta``; no monotonicity needed.

    See :mod:`exitguard.risk.procedures`.

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
    chosen = procedures.get_procedure(procedure)
    name = chosen.name
    epsilon = check_open_unit(target_risk, "target_risk")
    level = check_open_unit(delta, "delta")
    table, cost_array, grid = check_table(
        losses, loss_bound=loss_bound, cost=cost, thresholds=thresholds
    )
    bound = float(loss_bound)
    if bet_cap is not None:
        check_positive(bet_cap, "bet_cap")
    check_choice(order, "order", ORDERS)
    sample_order = used_seed = None
    read = table
    if chosen.order_dependent:
        sample_order = order
        if order == "random":
            used_seed = order_seed(seed)
            generator = np.random.default_rng(used_seed)
            read = procedures.in_order(table, procedures.reading_order(table, generator))
    selection = procedures.run(
        read, target_risk=epsilon, delta=level, procedure=chosen, loss_bound=bound, bet_cap=bet_cap
    )
    index = selection.index
    if chosen.needs_monotone_risk or name == "naive":
        _warn_non_monotone(table, selection, name)
    if selection.certified and selection.empirical_risk[index] > epsilon:
        warnings.warn(
            f"the certified row's own calibration risk {selection.empirical_risk[index]:.4g} is "
            f"above the target {epsilon:g}: legal for {name!r} (its bound is a statement about "
            "the population, and overthinking samples or the reading order can put it below "
            "the sample mean), but rare; check the policy on held-out data before deploying.",
            CertifiedAboveTargetWarning,
            stacklevel=2,
        )
    if not selection.certified and chosen.has_guarantee:
        warnings.warn(
            f"no early-exit policy could be certified by {name!r} at target_risk={epsilon:g}, "
            f"delta={level:g} with n={table.shape[1]} samples: using the full model. "
            "More calibration data or a larger target risk may help.",
            RiskNotControlledWarning,
            stacklevel=2,
        )
    upper = selection.upper_bound
    p_value = None
    if chosen.test == "crc":
        upper = float(selection.statistic[index])
    if name.startswith("ltt"):
        p_value = float(selection.statistic[index])
    # Row 0 is the fallback, the full model: never exit early, whatever its grid value.
    threshold: float | None = math.inf if index == 0 else None
    if grid is not None and index > 0:
        threshold = float(grid[index])
    return ExitPolicy(
        threshold=threshold,
        index=index,
        procedure=name,
        guarantee=chosen.guarantee_text(epsilon, level),
        target_risk=epsilon,
        delta=level,
        n=int(table.shape[1]),
        empirical_risk=float(selection.empirical_risk[index]),
        upper_bound=upper,
        p_value=p_value,
        expected_cost=_expected_cost(cost_array, index),
        full_cost=_expected_cost(cost_array, 0),
        certified=selection.certified,
        loss_bound=bound,
        risk=risk,
        confidence=confidence,
        data_fingerprint=fingerprint(table),
        sample_order=sample_order,
        order_seed=used_seed,
    )


def _check_table_memory(n_rows: int, n: int, n_exits: int) -> None:
    """Exits (K, n, L-1) booleans, then exits, losses and costs (K, n) of 8 bytes each."""
    check_memory(
        float(n_rows) * n * (n_exits + 4 * 8),
        what=f"building a table of {n_rows} thresholds x {n} samples",
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
    _check_table_memory(len(grid), probs.shape[0], probs.shape[1])
    exits = exit_indices(scores, grid)  # (K, n)
    chosen = get_risk(risk, consistency_label=consistency_label, rng=rng)
    table = loss_table(per_exit_losses(probs, labels, chosen), exits, clip=clip)  # (K, n)
    per_exit_cost = check_exit_cost(exit_cost, probs.shape[1])  # (L,)
    return {"losses": table, "cost": per_exit_cost[exits], "thresholds": grid, "exits": exits}


def build_table_from_predictions(
    confidences: ArrayLike,
    predictions: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    risk: str | Risk = "prediction_gap",
    thresholds: ArrayLike | None = None,
    exit_cost: ArrayLike | None = None,
    n_classes: int | None = None,
    clip: bool = False,
) -> dict[str, Array]:
    """Loss and cost tables from outputs saved as a confidence and a predicted class per exit.

    Many published early-exit models save, per sample and exit, only the confidence and the
    predicted class (no probabilities). The 0-1 risks (``prediction_gap``,
    ``prediction_consistency``) need nothing more; Brier risks are refused.

    Parameters
    ----------
    confidences : array of shape (n, L)
        Confidence of each sample at each exit, in [0, 1] (higher = safer to stop).
    predictions : int array of shape (n, L)
        Predicted class of each sample at each exit; the last exit is the full model.
    labels : int array of shape (n,), optional
        Ground truth; required for ``prediction_gap``.
    risk, thresholds, exit_cost, clip
        As in :func:`build_table`.
    n_classes : int, optional
        Number of classes; predictions and labels must lie below it when given.

    Returns
    -------
    dict
        ``losses`` (K, n), ``cost`` (K, n), ``thresholds`` (K,) and ``exits`` (K, n).
    """
    scores = check_unit_scores(confidences, "confidences", ndim=2)  # (n, L)
    if n_classes is not None:
        check_int(n_classes, "n_classes", minimum=1)
    raw = np.asarray(predictions)
    if raw.shape != scores.shape:
        raise ValueError(
            f"`predictions` must have the shape of `confidences` {scores.shape}; got {raw.shape}."
        )
    chosen = get_risk(risk)
    per_exit = per_exit_prediction_losses(raw, labels, chosen, n_classes=n_classes)  # (n, L)
    grid = as_threshold_grid(thresholds)  # (K,)
    _check_table_memory(len(grid), scores.shape[0], scores.shape[1])
    exits = exit_indices(scores, grid)  # (K, n)
    table = loss_table(per_exit, exits, clip=clip)  # (K, n)
    per_exit_cost = check_exit_cost(exit_cost, scores.shape[1])  # (L,)
    return {"losses": table, "cost": per_exit_cost[exits], "thresholds": grid, "exits": exits}


def calibrate_predictions(
    confidences: ArrayLike,
    predictions: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    risk: str | Risk = "prediction_gap",
    target_risk: float,
    delta: float = 0.1,
    procedure: str = "ucb-wsr",
    thresholds: ArrayLike | None = None,
    exit_cost: ArrayLike | None = None,
    n_classes: int | None = None,
    confidence: str = "provided",
    clip: bool = False,
    bet_cap: float | None = None,
    order: str = "random",
    seed: int | None = None,
) -> ExitPolicy:
    """Calibrate an exit threshold from saved per-exit confidences and predicted classes.

    The table comes from :func:`build_table_from_predictions`; the guarantee is the one of
    :func:`calibrate_table`. ``confidence`` names the saved confidence in the policy, so that
    :meth:`ExitPolicy.apply` can refuse outputs scored another way.
    """
    chosen = get_risk(risk)
    tables = build_table_from_predictions(
        confidences,
        predictions,
        labels,
        risk=chosen,
        thresholds=thresholds,
        exit_cost=exit_cost,
        n_classes=n_classes,
        clip=clip,
    )
    return _calibrate_built(
        tables,
        chosen,
        confidence,
        n_exits=int(np.shape(confidences)[1]),
        target_risk=target_risk,
        delta=delta,
        procedure=procedure,
        bet_cap=bet_cap,
        order=order,
        seed=seed,
    )


def _calibrate_built(
    tables: dict[str, Array], risk: Risk, confidence: str, *, n_exits: int, **settings: Any
) -> ExitPolicy:
    """:func:`calibrate_table` on tables built from outputs, recording risk, measure, exits."""
    policy = calibrate_table(
        tables["losses"],
        loss_bound=risk.loss_bound,
        cost=tables["cost"],
        thresholds=tables["thresholds"],
        risk=risk.name,
        confidence=confidence,
        **settings,
    )
    return policy.with_model(n_exits=n_exits, confidence=confidence)


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
    order: str = "random",
    seed: int | None = None,
    confidence_name: str | None = None,
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
    target_risk, delta, procedure, bet_cap, order, seed
        As in :func:`calibrate_table`.
    confidence : str or callable
        ``max_softmax``, ``margin``, ``entropy``, ``patience`` or (n, L, C) -> (n, L).
    confidence_name : str, optional
        The name recorded for a callable ``confidence`` (default: its ``__name__``; a lambda
        needs one), so the policy can refuse to threshold another score later.
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
    confidence_label = confidence_label_of(confidence, confidence_name)
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
    return _calibrate_built(
        tables,
        chosen,
        confidence_label,
        n_exits=int(np.shape(exit_probs)[1]),
        target_risk=target_risk,
        delta=delta,
        procedure=procedure,
        bet_cap=bet_cap,
        order=order,
        seed=seed,
    )


def confidence_label_of(confidence: str | ConfidenceFn, name: str | None) -> str:
    """The name a policy records for its confidence measure (required for a callable)."""
    if isinstance(confidence, str):
        if name is not None and name != confidence:
            raise ValueError(
                f"`confidence_name` names a custom measure; got {name!r} with the built-in "
                f"measure {confidence!r}."
            )
        return confidence
    label = name if name is not None else getattr(confidence, "__name__", None)
    if not isinstance(label, str) or not label.isidentifier() or label in CONFIDENCES:
        raise ValueError(
            "a custom confidence measure needs a name the policy can record, so the threshold "
            'is never applied to another score: pass `confidence_name="my_measure"` '
            f"(not a lambda, not a built-in name); got {label!r}."
        )
    return label


def as_procedure_list(values: str | Sequence[str]) -> list[str]:
    items = [values] if isinstance(values, str) else list(values)
    if not items:
        raise ValueError("`procedures` must name at least one procedure; got an empty list.")
    return [procedures.canonical_procedure(p) for p in items]
