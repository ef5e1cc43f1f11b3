"""Several risks at once, threshold vectors and tail risks: per-exit outputs in, ExitPolicy out.

:func:`calibrate_pareto` is the user-facing entry point of :mod:`exitguard.risk.pareto`. It
turns per-exit outputs into per-exit losses for every requested risk (a mean risk, or a tail
risk ``P(loss > t)``), then certifies

* ``space="vectors"`` (the default): a threshold vector, one threshold per exit, by Pareto
  Testing (the order learnt on a split of the calibration data, or on an external
  optimisation set; :func:`exitguard.risk.pareto.pareto_test`);
* ``space="scalar"``: one threshold shared by every exit, tested along the grid in its
  natural order for every risk at once (no split);
* ``space=ThresholdFamily(...)``: a threshold function of one scalar, likewise.

A risk is named by a :class:`RiskTarget`, or by text ``NAME[>TOLERANCE][:EPSILON]``:
``"prediction_gap:0.02"`` promises ``E[gap] <= 0.02``, ``"distribution_consistency>0.1:0.05"``
promises ``P(Brier loss against the full model > 0.1) <= 0.05`` (a tail risk).

**Guarantee.** With calibration and test data i.i.d. from one distribution,
``P(some risk r of the chosen configuration exceeds epsilon_r) <= delta`` over the
calibration draw (and the seeded split and reading order); see :mod:`exitguard.risk.pareto`
for the argument and for what the split costs. No monotonicity is assumed.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from exitguard.policy import ExitPolicy, RiskPromise, fingerprint, multi_guarantee_text
from exitguard.risk._validation import check_class_indices, check_exit_cost, check_unit_scores
from exitguard.risk.confidence import ConfidenceFn, as_probabilities
from exitguard.risk.confidence import confidences as confidence_scores
from exitguard.risk.configurations import ThresholdFamily, family_table
from exitguard.risk.exits import as_threshold_grid
from exitguard.risk.losses import Risk, get_risk, per_exit_losses, per_exit_prediction_losses
from exitguard.risk.pareto import (
    ParetoSelection,
    VectorSearch,
    pareto_test,
    pareto_test_table,
)
from exitguard.risk.procedures import Procedure, get_procedure
from exitguard.risk.tail import exceedance_per_exit

Array = NDArray[np.float64]

_TARGET = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:>\s*([^:\s]+))?\s*(?::\s*(\S+))?\s*$")


@dataclasses.dataclass(frozen=True)
class RiskTarget:
    """One promise to certify: a risk, its epsilon, and for a tail risk its tolerance.

    Attributes
    ----------
    risk : str
        A risk of :data:`exitguard.risk.losses.RISKS` (e.g. ``"prediction_consistency"``).
    target_risk : float
        Epsilon in (0, 1).
    tolerance : float or None
        ``t`` of a tail risk: the promise is ``P(loss > t) <= target_risk`` for the risk's
        per-sample loss against the full model; None for the mean ``E[loss] <= target_risk``.

    Examples
    --------
    >>> RiskTarget.parse("distribution_consistency>0.1:0.05")
    RiskTarget(risk='distribution_consistency', target_risk=0.05, tolerance=0.1)
    """

    risk: str
    target_risk: float
    tolerance: float | None = None

    def __post_init__(self) -> None:
        get_risk(self.risk)  # a known risk, or a clear error naming the allowed ones
        value = self.target_risk
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"`target_risk` must be a float in (0, 1); got {value!r}.")
        if not 0.0 < value < 1.0:
            raise ValueError(f"`target_risk` must be a float in (0, 1); got {value!r}.")
        if self.tolerance is not None:
            t = self.tolerance
            if isinstance(t, bool) or not isinstance(t, (int, float)):
                raise TypeError(f"`tolerance` must be a float >= 0; got {t!r}.")
            if not (math.isfinite(t) and t >= 0):
                raise ValueError(f"`tolerance` must be a finite float >= 0; got {t!r}.")

    @classmethod
    def parse(cls, text: str, *, target_risk: float | None = None) -> RiskTarget:
        """``NAME[>TOLERANCE][:EPSILON]``; ``target_risk`` stands in for a missing epsilon."""
        name, tolerance, epsilon = split_risk_target(text)
        if epsilon is None:
            if target_risk is None:
                raise ValueError(
                    f"the risk target {text!r} names no epsilon: write {name}:EPSILON."
                )
            epsilon = target_risk
        return cls(name, epsilon, tolerance)

    @property
    def label(self) -> str:
        return self.risk if self.tolerance is None else f"{self.risk}>{self.tolerance:g}"


def split_risk_target(text: str) -> tuple[str, float | None, float | None]:
    """``NAME[>TOLERANCE][:EPSILON]`` as (name, tolerance or None, epsilon or None).

    Examples
    --------
    >>> split_risk_target("distribution_gap>0.1:0.05")
    ('distribution_gap', 0.1, 0.05)
    >>> split_risk_target("prediction_gap")
    ('prediction_gap', None, None)
    """
    if not isinstance(text, str):
        raise TypeError(f"a risk target must be text NAME[>T][:EPS]; got {text!r}.")
    match = _TARGET.match(text)
    if match is None:
        raise ValueError(
            "a risk target must read NAME[>TOLERANCE][:EPSILON], e.g. 'prediction_gap:0.02' "
            f"or 'distribution_gap>0.1:0.05'; got {text!r}."
        )
    name, tolerance, epsilon = match.groups()
    try:
        return (
            name,
            None if tolerance is None else float(tolerance),
            None if epsilon is None else float(epsilon),
        )
    except ValueError as error:
        raise ValueError(
            f"the risk target {text!r} must hold numbers after '>' and ':'."
        ) from error


def as_risk_targets(
    risks: Sequence[str | RiskTarget] | str | RiskTarget, *, target_risk: float | None = None
) -> tuple[RiskTarget, ...]:
    """Risk targets from objects or text (``target_risk`` fills a missing epsilon)."""
    items = [risks] if isinstance(risks, (str, RiskTarget)) else list(risks)
    if not items:
        raise ValueError("`risks` must name at least one risk; got an empty list.")
    targets = tuple(
        r if isinstance(r, RiskTarget) else RiskTarget.parse(r, target_risk=target_risk)
        for r in items
    )
    labels = [t.label for t in targets]
    if len(set(labels)) != len(labels):
        raise ValueError(f"`risks` must not repeat a risk; got {labels}.")
    return targets


def per_exit_tables(
    targets: Sequence[RiskTarget],
    *,
    probs: Array | None,
    labels: ArrayLike | None,
    predictions: NDArray[np.int64] | None = None,
    n_classes: int | None = None,
    rng: np.random.Generator | int | None = None,
) -> tuple[Array, Array]:
    """Absolute per-exit losses of every target (R, n, L) and their loss bounds (R,).

    From probabilities (n, L, C) or, for the prediction risks only, from predicted classes
    (n, L). A tail risk becomes the 0-1 exceedance table of its loss (bound 1).
    """
    generator = np.random.default_rng(rng)
    tables, bounds = [], []
    # A loop over the few risks: each has its own loss function.
    for target in targets:
        risk: Risk = get_risk(target.risk, rng=generator)
        if risk.needs_labels and labels is None:
            raise ValueError(
                f"the risk {risk.name!r} compares with the labels: give `labels`, or use a "
                "consistency risk (agreement with the full model, no labels)."
            )
        if probs is not None:
            table = per_exit_losses(probs, labels, risk)  # (n, L)
        else:
            if risk.prediction_loss is None:
                raise ValueError(
                    f"the risk {risk.name!r} needs probabilities; saved predictions allow only "
                    "prediction_gap and prediction_consistency."
                )
            table = per_exit_prediction_losses(predictions, labels, risk, n_classes=n_classes)
        if target.tolerance is None:
            tables.append(table)
            bounds.append(risk.loss_bound)
        else:
            tables.append(exceedance_per_exit(table, target.tolerance))
            bounds.append(1.0)
    return np.stack(tables), np.array(bounds, dtype=np.float64)


def calibrate_pareto(
    exit_probs: ArrayLike | None = None,
    labels: ArrayLike | None = None,
    *,
    risks: Sequence[str | RiskTarget] | str | RiskTarget,
    delta: float = 0.1,
    procedure: str | Procedure = "ucb-wsr",
    space: str | ThresholdFamily = "vectors",
    confidence: str | ConfidenceFn = "max_softmax",
    confidence_name: str | None = None,
    from_logits: bool = False,
    confidences: ArrayLike | None = None,
    predictions: ArrayLike | None = None,
    n_classes: int | None = None,
    exit_cost: ArrayLike | None = None,
    head_cost: ArrayLike | None = None,
    thresholds: ArrayLike | None = None,
    opt_fraction: float = 0.25,
    search: VectorSearch | None = None,
    opt_exit_probs: ArrayLike | None = None,
    opt_labels: ArrayLike | None = None,
    seed: int | None = None,
    rng: np.random.Generator | int | None = None,
) -> ExitPolicy:
    """Certify exit thresholds for one or several risks at once (mean or tail risks).

    Parameters
    ----------
    exit_probs : array of shape (n, L, C), optional
        Per-exit class probabilities (logits with ``from_logits=True``) of ``n``
        calibration samples; the last exit is the full model. Or give ``confidences`` and
        ``predictions`` (saved outputs; the prediction risks only).
    labels : int array of shape (n,), optional
        Ground truth, for the gap risks.
    risks : sequence of str or RiskTarget
        The promises, e.g. ``["prediction_consistency:0.05", "prediction_gap:0.02"]`` or
        ``["distribution_consistency>0.1:0.05"]`` (a tail risk: ``P(loss > 0.1) <= 0.05``).
    delta : float in (0, 1)
        Allowed probability that any risk exceeds its epsilon.
    procedure : str or Procedure
        A fixed-sequence p-value procedure: ``"ucb-wsr"`` (default), ``"ltt"``
        (Hoeffding-Bentkus), ``"ucb-hb"``, ``"ucb-hoeffding"``, ``"ucb-binomial"``.
    space : {"vectors", "scalar"} or ThresholdFamily
        What is certified: a threshold vector by Pareto Testing (default), one scalar
        threshold, or a threshold function, the last two along their natural order.
    confidence, confidence_name, from_logits
        The confidence measure the thresholds apply to (as in :func:`exitguard.calibrate`).
    confidences : array (n, L), optional
        Saved confidences (with ``predictions``), instead of ``exit_probs``.
    predictions : int array (n, L), optional
        Saved per-exit predicted classes; ``n_classes`` their number of classes.
    exit_cost, head_cost : arrays (L,), optional
        Cost of leaving at each exit with every head on the way (default: exits evaluated)
        and, optionally, of each exit head (heads of disabled exits are then not charged).
    thresholds : array, optional
        The scalar grid (``space="scalar"``) or the grid of the family's scalar; default
        ``inf, 1.00, 0.99, ..., 0.00``.
    opt_fraction : float in (0, 1)
        Pareto Testing: the share of calibration samples that learn the order.
    search : VectorSearch, optional
        Pareto Testing: settings of the search over vectors.
    opt_exit_probs, opt_labels : optional
        Pareto Testing: an external optimisation set (n_opt, L, C) (and its labels, for gap
        risks), independent of the calibration and test data; all ``n`` calibration
        samples then test. Unlabeled samples suffice for consistency risks.
    seed : int, optional
        Seeds the split, the reading order and the search (default fresh, recorded).
    rng : numpy Generator or int, optional
        Seeds the pseudo-labels of ``distribution_consistency``.

    Returns
    -------
    ExitPolicy
        With ``thresholds`` (vectors), ``threshold`` (scalar) or ``threshold`` and
        ``threshold_function`` (a family); ``risks`` lists every promise when there are
        several or one is a tail risk; ``pareto`` and ``n_opt`` record Pareto Testing.

    Notes
    -----
    Guarantee: for i.i.d. calibration and test data, ``P(R_r(policy) > epsilon_r for some
    r) <= delta`` over calibration sets (:mod:`exitguard.risk.pareto`); for vectors, the
    p-values see only the testing part of the split.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> probs = rng.dirichlet(np.ones(3), size=(400, 4))  # (n, L, C)
    >>> policy = calibrate_pareto(probs, risks=["prediction_consistency:0.2"], seed=1)
    >>> policy.kind, policy.pareto, policy.n_opt
    ('vector', 'split', 100)
    """
    targets = as_risk_targets(risks)
    chosen = get_procedure(procedure)
    if (exit_probs is None) == (confidences is None):
        raise ValueError(
            "give either `exit_probs` (n, L, C) or `confidences` (n, L) with `predictions`."
        )
    from exitguard.calibration import confidence_label_of

    if exit_probs is not None:
        probs = as_probabilities(exit_probs, from_logits=from_logits)  # (n, L, C)
        scores = confidence_scores(probs, measure=confidence)  # (n, L)
        label = confidence_label_of(confidence, confidence_name)
        per_exit, bounds = per_exit_tables(targets, probs=probs, labels=labels, rng=rng)
    else:
        scores = check_unit_scores(confidences, "confidences", ndim=2)  # (n, L)
        if predictions is None:
            raise ValueError("`predictions` (n, L) are required with `confidences`.")
        chosen_classes = check_class_indices(
            predictions, "predictions", shape=scores.shape, n_classes=n_classes
        )
        label = confidence_name if confidence_name is not None else "provided"
        per_exit, bounds = per_exit_tables(
            targets,
            probs=None,
            labels=labels,
            predictions=chosen_classes,
            n_classes=n_classes,
            rng=rng,
        )
    n_exits = scores.shape[1]
    costs = check_exit_cost(exit_cost, n_exits)  # (L,)
    names = tuple(t.label for t in targets)
    eps = [t.target_risk for t in targets]
    common: dict[str, Any] = {
        "targets": targets,
        "bounds": bounds,
        "procedure": chosen,
        "delta": delta,
        "confidence": label,
        "n_exits": n_exits,
        "data": fingerprint(scores, per_exit),
    }
    if isinstance(space, str) and space == "vectors":
        if thresholds is not None:
            raise ValueError(
                '`thresholds` (a scalar grid) applies to space="scalar" or a ThresholdFamily; '
                "the search over vectors picks its own levels (see `search`)."
            )
        opt: dict[str, Any] = {}
        if opt_exit_probs is not None:
            opt_probs = as_probabilities(opt_exit_probs, from_logits=from_logits)
            opt["opt_confidences"] = confidence_scores(opt_probs, measure=confidence)
            opt["opt_per_exit_losses"] = per_exit_tables(
                targets, probs=opt_probs, labels=opt_labels, rng=rng
            )[0]
        elif opt_labels is not None:
            raise ValueError("`opt_labels` go with `opt_exit_probs` (an external set).")
        selection = pareto_test(
            scores,
            per_exit,
            target_risks=eps,
            delta=delta,
            loss_bounds=bounds,
            exit_cost=costs,
            head_cost=head_cost,
            procedure=chosen,
            opt_fraction=opt_fraction,
            search=search,
            risk_names=names,
            seed=seed,
            **opt,
        )
        return pareto_policy(selection, **common)
    if isinstance(space, str) and space == "scalar":
        family = ThresholdFamily("constant")
    elif isinstance(space, ThresholdFamily):
        family = space
    else:
        raise ValueError(
            f'`space` must be "vectors", "scalar" or a ThresholdFamily; got {space!r}.'
        )
    grid = as_threshold_grid(thresholds)  # (K,)
    table = family_table(
        scores,
        per_exit,
        family=family,
        lambdas=grid,
        loss_bounds=bounds,
        exit_cost=costs,
        head_cost=head_cost,
    )
    selection = pareto_test_table(
        table.losses,
        target_risks=eps,
        cost=table.cost,
        delta=delta,
        loss_bounds=bounds,
        procedure=chosen,
        order="natural",
        thresholds=grid,
        risk_names=names,
        seed=seed,
    )
    return pareto_policy(
        selection, **common, family=None if space == "scalar" else family, grid=grid
    )


def pareto_policy(
    selection: ParetoSelection,
    *,
    targets: Sequence[RiskTarget],
    bounds: ArrayLike,
    procedure: Procedure,
    delta: float,
    confidence: str | None,
    n_exits: int,
    data: str,
    family: ThresholdFamily | None = None,
    grid: ArrayLike | None = None,
) -> ExitPolicy:
    """The :class:`ExitPolicy` of a :class:`ParetoSelection` (vectors, or a natural grid).

    For ``order="natural"`` selections ``grid`` holds the scalar of every row (the
    threshold, or the family's scalar when ``family`` is given).
    """
    index = selection.index
    promises = tuple(
        RiskPromise(
            risk=t.risk,
            target_risk=float(t.target_risk),
            loss_bound=float(b),
            empirical_risk=float(selection.empirical_risks[r]),
            p_value=float(selection.p_values[r]) if index > 0 else None,
            upper_bound=(
                float(selection.upper_bounds[r])
                if selection.upper_bounds is not None and index > 0
                else None
            ),
            tolerance=t.tolerance,
        )
        for r, (t, b) in enumerate(zip(targets, np.asarray(bounds, dtype=float), strict=True))
    )
    first = promises[0]
    several = len(promises) > 1 or first.tolerance is not None
    pareto = None if selection.order == "natural" else selection.opt_source
    n_opt = None if pareto is None else selection.n_opt
    n = selection.n_test if pareto == "external" else selection.n
    if pareto is None:
        values = as_threshold_grid(grid)
        lam = float(values[selection.row if selection.row is not None else index])
        vector, threshold = None, lam
    else:
        vector = tuple(float(v) for v in selection.thresholds)  # type: ignore[union-attr]
        threshold = None
    multi = several or pareto is not None
    guarantee = (
        multi_guarantee_text(procedure, promises, delta, pareto)
        if multi
        else procedure.guarantee_text(first.target_risk, delta)
    )
    random_order = pareto is not None or procedure.order_dependent
    return ExitPolicy(
        threshold=threshold,
        index=index,
        procedure=procedure.name,
        guarantee=guarantee,
        target_risk=first.target_risk,
        delta=float(delta),
        n=n,
        empirical_risk=first.empirical_risk,
        upper_bound=first.upper_bound,
        p_value=first.p_value,
        expected_cost=float(selection.expected_cost),
        full_cost=float(selection.full_cost),
        certified=bool(selection.certified),
        loss_bound=first.loss_bound,
        risk=first.risk,
        confidence=confidence,
        n_exits=n_exits,
        data_fingerprint=data,
        sample_order="random" if random_order else None,
        order_seed=selection.seed if random_order else None,
        thresholds=vector,
        threshold_function=family,
        risks=promises if several else (),
        pareto=pareto,
        n_opt=n_opt,
    )
