"""Pareto Testing: certify several risks at once over configurations without a natural order.

Laufer-Goldshtein, Fisch, Barzilay and Jaakkola, "Efficiently Controlling Multiple Risks with
Pareto Testing", ICLR 2023. A scalar threshold grid has a natural order (row 0 the full model,
rows growing more aggressive) along which fixed-sequence testing runs; a space of threshold
*vectors* (one threshold per exit, exponential in the number of exits) has none, and testing
every vector would need a multiplicity correction that leaves nothing certified. Pareto
Testing learns the order on one part of the calibration data and tests along it on the other:

1. **Split.** A seeded uniformly random permutation of the ``n`` calibration samples (of
   their order as given) puts the first ``round(opt_fraction * n)`` into an optimisation
   part and the rest, in that random order, into a testing part. With ``seed=None`` (the
   default) the permutation comes from fresh entropy and the split is uniformly random
   whatever the order of the arrays. A fixed seed repeats a calibration exactly; it keeps
   the guarantee when the order of the arrays is itself exchangeable (e.g. as collected),
   not when they are sorted by something related to the losses. (A canonical sort of the
   samples before the permutation, which would make the result depend on the set of samples
   only, is deliberately not done: with a fixed seed it turns the split into a fixed
   function of the sample values, which is not a random split; with ``seed=0`` on the
   population of ``tests/validity/test_order.py`` the same happens to the WSR reading order
   of :func:`exitguard.risk.procedures.reading_order`, at 12% violations for delta = 0.1.)
2. **Search** (optimisation part only). A real search over threshold vectors
   (:func:`search_vectors`), every candidate move evaluated at once: coordinate descents on
   ``cost + mu * sum_r risk_r / epsilon_r`` over a sweep of multipliers ``mu`` (each step
   tries every level of one exit's threshold, from one sort of the samples:
   :func:`coordinate_curve`), greedy paths from the full model that lower one exit's
   threshold at a time by the most cost saved per unit of risk added, restarts with
   perturbed risk weights, jittered starts and noisy scores, and the threshold families
   (the scalar threshold among them). The search reads *smoothed* losses (each sample's loss
   at an exit averaged with its confidence neighbours, :func:`smooth_losses`), so that a
   small optimisation part, which sees no loss at all for many configurations, still ranks
   them. The candidates' risks and mean cost give the **Pareto front** of
   (risk_1, ..., risk_R, cost).
3. **Order** (optimisation part only). The front is sorted from the safest configuration, as
   the paper does, by the p-values of "risk_r >= epsilon_r" on the optimisation part (the
   largest over risks), here in the normal approximation: by the largest margin
   ``(risk_r - epsilon_r) / sd_r`` with ``sd_r`` the pooled standard deviation of risk
   ``r``'s losses on the front (for one risk: by the risk), which orders signed losses too
   and never underflows; ties are broken by the higher cost. The full model is row 0 of
   the front, the fallback, never tested.
4. **Test** (testing part only). Fixed-sequence testing along that order with one p-value per
   risk, from a fixed-sequence procedure of the registry
   (:func:`exitguard.risk.procedures.get_procedure`): ``"ltt"`` (Hoeffding-Bentkus),
   ``"ucb-wsr"`` (Waudby-Smith-Ramdas betting, read in the seeded random order of the split),
   ``"ucb-hb"``, ``"ucb-hoeffding"``, or ``"ucb-binomial"`` (exact, 0-1 losses). A
   configuration passes when *every* risk passes the procedure's test, i.e. when the largest
   of its p-values passes (``<= delta`` for LTT, ``< delta`` for a UCB); the certified set is
   the unbroken run of passing configurations from the start.
5. **Choose** the cheapest certified configuration, its cost estimated on all calibration
   data (``cost_estimate="all"``, the default: the lowest variance) or on the testing part.
   Nothing certified: the full model, with ``certified=False``.

**Guarantee.** If the calibration samples and the test samples are i.i.d. from one
distribution (an exchangeable sequence: then conditionally on its de Finetti mixture), then
over the draw of the calibration set, of the split and of the reading order,

    P( R_r(chosen) > epsilon_r for some risk r ) <= delta,

where ``R_r`` is the expected loss of risk ``r`` on a new test sample. *Why:* the order is a
function of the optimisation part, independent of the testing part, so each p-value is valid
given the order. Let ``j*`` be the first configuration of the order with some risk
``R_r > epsilon_r``: a certified set holding a bad configuration must have passed ``j*``,
which needs ``p_r(j*) <= delta`` for its violated risk ``r``: probability at most ``delta``.
Outside that event *every* certified configuration satisfies every risk at once, so choosing
among them by cost -- on any data, the testing part included -- keeps the guarantee. Nothing
is assumed about the network (no monotonicity) or the search (any search, any front).

**What the split costs.** The p-values see only the testing part (``n - n_opt`` samples), so a
configuration needs a lower empirical risk to pass than with all ``n`` samples, and the order
comes from only ``n_opt`` samples. Two ways around it, both valid:

* an **external optimisation set** (``opt_confidences``, ``opt_per_exit_losses``): any data
  independent of the calibration and test data -- e.g. further *unlabeled* samples scored
  with a label-free risk (consistency needs no labels), or the training set -- orders the
  configurations, and all ``n`` calibration samples test. It need not follow the test
  distribution: a biased set only makes the order less efficient, never the guarantee
  wrong, since the order is still independent of the testing data.
* a **natural order** (a scalar grid or a threshold family): no split is needed;
  ``pareto_test_table(..., order="natural")`` tests along the given rows on all ``n``
  samples (multi-risk Learn-then-Test), which for one risk is exactly
  :func:`exitguard.calibrate_table` with the same procedure.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from exitguard.risk._validation import (
    as_float_array,
    check_choice,
    check_exit_cost,
    check_int,
    check_open_unit,
    check_open_unit_list,
    check_unit_scores,
)
from exitguard.risk.configurations import (
    ThresholdFamily,
    _vector_exits,
    as_loss_bounds,
    check_head_cost,
    check_per_exit_losses,
    configuration_costs,
)
from exitguard.risk.exits import NEVER
from exitguard.risk.procedures import REGISTRY, Procedure, get_procedure, reading_order

Array = NDArray[np.float64]

PARETO_PROCEDURES = tuple(
    name for name, p in REGISTRY.items() if p.test == "p-value" and p.rule == "run"
)
"""The procedures Pareto Testing accepts: fixed-sequence tests of one p-value per risk."""
COST_ESTIMATES = ("all", "test")
ORDERS = ("pareto", "natural")


class NothingCertifiedWarning(UserWarning):
    """Pareto Testing certified no configuration; the full model is returned."""


# ------------------------------------------------------------------------ search settings


@dataclasses.dataclass(frozen=True)
class VectorSearch:
    """Settings of :func:`search_vectors` (the search over threshold vectors).

    Attributes
    ----------
    levels : int
        Candidate thresholds per exit: the quantiles of that exit's confidences on the
        optimisation part at ``levels`` evenly spaced probabilities (plus 0).
    restarts : int
        Repetitions of the descents and the greedy path with perturbed risk weights, jittered
        starts and noisy move scores, after the plain one.
    multipliers : int
        Number of risk multipliers of the coordinate descents (geometric from 0.01 to 100).
    sweeps : int
        Most sweeps over the exits per coordinate descent.
    greedy : bool
        Whether the greedy paths join the candidates.
    steps : tuple of int
        How many levels one move may lower an exit's threshold by; every exit and step is a
        candidate move, all evaluated at once.
    noise : float
        Standard deviation of the log-normal noise on move scores in the restarts (and of
        the log risk weights).
    max_risk_ratio : float
        A path stops once some risk exceeds ``max_risk_ratio * epsilon_r`` on the
        optimisation part (configurations far beyond the target cannot pass the test).
    smoothing : float
        The search, the front and the order read *smoothed* optimisation losses (see
        :func:`smooth_losses`): each sample's loss at an exit is replaced by the mean loss of
        the ``2 h + 1`` samples with the nearest confidences at that exit,
        ``h = ceil(smoothing * sqrt(n_opt))``. A small optimisation part sees no loss at all
        for many configurations, and raw losses then give every one of them the same risk;
        smoothing ranks them by the losses of their neighbours instead. 0 reads the raw
        losses (the paper). Only the optimisation part is smoothed: the test is untouched.
    scalar_levels : int
        Size of the scalar threshold grid of each family (quantiles of all confidences).
    families : tuple of ThresholdFamily
        Threshold functions of one scalar whose grids join the candidates; the constant
        family is the scalar threshold itself.
    """

    levels: int = 48
    restarts: int = 2
    multipliers: int = 24
    sweeps: int = 3
    greedy: bool = True
    steps: tuple[int, ...] = (1, 2, 4, 8, 16)
    noise: float = 0.3
    max_risk_ratio: float = 2.0
    smoothing: float = 1.0
    scalar_levels: int = 200
    families: tuple[ThresholdFamily, ...] = (
        ThresholdFamily("constant"),
        ThresholdFamily("scaled", tau=0.5),
        ThresholdFamily("scaled", tau=1.5),
    )

    def __post_init__(self) -> None:
        check_int(self.levels, "levels", minimum=2)
        check_int(self.restarts, "restarts", minimum=0)
        check_int(self.multipliers, "multipliers", minimum=1)
        check_int(self.sweeps, "sweeps", minimum=1)
        check_int(self.scalar_levels, "scalar_levels", minimum=2)
        if not self.steps:
            raise ValueError("`steps` must hold at least one step size; got an empty tuple.")
        for step in self.steps:
            check_int(step, "steps", minimum=1)
        if not (math.isfinite(self.noise) and self.noise >= 0):
            raise ValueError(f"`noise` must be a finite float >= 0; got {self.noise!r}.")
        if not (math.isfinite(self.smoothing) and self.smoothing >= 0):
            raise ValueError(f"`smoothing` must be a finite float >= 0; got {self.smoothing!r}.")
        if not (math.isfinite(self.max_risk_ratio) and self.max_risk_ratio > 0):
            raise ValueError(
                f"`max_risk_ratio` must be a positive finite float; got {self.max_risk_ratio!r}."
            )
        for family in self.families:
            if not isinstance(family, ThresholdFamily):
                raise TypeError(
                    f"`families` must hold ThresholdFamily objects; got {type(family).__name__}."
                )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["steps"] = list(self.steps)
        data["families"] = [f.to_dict() for f in self.families]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VectorSearch:
        values = dict(data)
        values["steps"] = tuple(int(s) for s in values["steps"])
        values["families"] = tuple(ThresholdFamily.from_dict(f) for f in values["families"])
        return cls(**values)


# ------------------------------------------------------------------------- array functions


def pareto_front(points: ArrayLike) -> NDArray[np.bool_]:
    """Which points are Pareto-optimal when every column is minimised; (K, D) -> (K,).

    A point is dominated when another is no worse in every column and better in at least
    one. Exact duplicates do not dominate each other (both are kept).

    Examples
    --------
    >>> pareto_front([[0.1, 5.0], [0.2, 4.0], [0.2, 6.0], [0.3, 4.0]])
    array([ True,  True, False, False])
    """
    values = as_float_array(points, "points", ndim=2)  # (K, D)
    k = values.shape[0]
    dominated = np.zeros(k, dtype=bool)
    rows = max(1, 2_000_000 // max(1, k * values.shape[1]))
    # A loop over chunks of points only to bound memory at chunk x K x D comparisons.
    for start in range(0, k, rows):
        part = values[start : start + rows]  # (c, D)
        no_worse = np.all(values[None, :, :] <= part[:, None, :], axis=-1)  # (c, K)
        better = np.any(values[None, :, :] < part[:, None, :], axis=-1)  # (c, K)
        dominated[start : start + rows] = np.any(no_worse & better, axis=-1)
    return ~dominated


def order_front(
    risks: ArrayLike,
    cost: ArrayLike,
    *,
    target_risks: ArrayLike,
    scales: ArrayLike,
) -> NDArray[np.int64]:
    """The testing order of configurations, safest first; risks (R, F), cost (F,) -> (F,).

    Sorted by the largest over risks of the margin ``(risk_r - epsilon_r) / scale_r`` (with
    ``scale_r`` the standard deviation of risk ``r``'s losses, this is the order of the
    normal-approximation p-values of "risk_r >= epsilon_r"; for one risk it is the order of
    the risks), then by the higher cost.
    """
    values = as_float_array(risks, "risks", ndim=2)  # (R, F)
    costs = as_float_array(cost, "cost", ndim=1)  # (F,)
    eps = np.asarray(target_risks, dtype=np.float64)[:, None]  # (R, 1)
    scale = np.maximum(np.asarray(scales, dtype=np.float64), 1e-12)[:, None]  # (R, 1)
    key = ((values - eps) / scale).max(axis=0)  # (F,)
    return np.lexsort((-costs, key)).astype(np.int64)


def loss_scales(losses: Array) -> Array:
    """One scale per risk for :func:`order_front`: the pooled sd; (R, F, n) -> (R,)."""
    return np.sqrt(losses.var(axis=-1).mean(axis=-1))


def p_value_table(
    losses: Array,
    target_risks: Array,
    *,
    procedure: str | Procedure,
    delta: float,
    loss_bounds: Array,
) -> Array:
    """p-values of "risk_r >= epsilon_r" for every risk and configuration; (R, F, n) -> (R, F).

    Each risk's p-values are the statistic of ``procedure`` (a p-value procedure of the
    registry). Losses are read in the order given (WSR depends on it: pass them in a random
    order).
    """
    chosen = _check_procedure(procedure)
    out = np.empty(losses.shape[:2])  # (R, F)
    # A loop over the few risks: each has its own epsilon and loss bound.
    for r in range(losses.shape[0]):
        try:
            out[r] = chosen.statistic(
                losses[r],
                np.array([target_risks[r]]),
                delta=delta,
                loss_bound=float(loss_bounds[r]),
            )[0]  # (F,)
        except ValueError as error:
            raise ValueError(f"risk {r}: {error}") from error
    return np.clip(out, 0.0, 1.0)


def fixed_sequence(p_values: ArrayLike, *, delta: float, procedure: str | Procedure = "ltt") -> int:
    """Length of the unbroken run of configurations that pass, from the first; (R, F) -> int.

    A configuration passes when every risk passes ``procedure``'s test: the largest of its
    p-values is ``<= delta`` (LTT) or ``< delta`` (a UCB, whose bound is then below epsilon).
    """
    values = as_float_array(p_values, "p_values", ndim=2)  # (R, F)
    chosen = _check_procedure(procedure)
    worst = values.max(axis=0)[None, :]  # (1, F) one "epsilon" row for passes()
    passing = chosen.passes(worst, np.zeros(1), delta=delta, n_rows=worst.shape[1] + 1)[0]
    return int(np.cumprod(passing).sum())


def smooth_losses(confidences: Array, relative: Array, *, smoothing: float) -> Array:
    """Relative losses of the early exits averaged over confidence neighbours; (R, n, L).

    For every exit ``l`` but the last, the samples are sorted by their confidence at ``l``
    and each sample's loss at ``l`` becomes the mean over the window of ``2 h + 1`` samples
    around it (clipped at the ends), ``h = ceil(smoothing * sqrt(n))``, shrunk towards the
    exit's mean loss by one pseudo-sample. The last exit keeps its losses (0 relative to
    itself). ``smoothing = 0`` returns the losses unchanged.
    """
    n, n_exits = confidences.shape
    if smoothing == 0 or n_exits < 2:
        return relative
    half = math.ceil(smoothing * math.sqrt(n))
    order = np.argsort(-confidences[:, :-1], axis=0, kind="stable")  # (n, L-1)
    early = np.take_along_axis(relative[:, :, :-1], order[None], axis=1)  # (R, n, L-1) sorted
    cumulative = np.concatenate(
        [np.zeros((early.shape[0], 1, n_exits - 1)), np.cumsum(early, axis=1)], axis=1
    )  # (R, n+1, L-1)
    rank = np.arange(n)
    low, high = np.clip(rank - half, 0, n), np.clip(rank + half + 1, 0, n)  # (n,)
    window = cumulative[:, high] - cumulative[:, low]  # (R, n, L-1)
    prior = relative[:, :, :-1].mean(axis=1, keepdims=True)  # (R, 1, L-1)
    smoothed = (window + prior) / ((high - low)[None, :, None] + 1.0)  # (R, n, L-1)
    out = relative.copy()
    # Back to the samples' own order, exit by exit (the few exits).
    for exit_ in range(n_exits - 1):
        out[:, order[:, exit_], exit_] = smoothed[:, :, exit_]
    return out


def _levels(confidence: Array, count: int) -> Array:
    """Candidate thresholds of one exit, descending, ``inf`` first and 0 last; (n,) -> (G,)."""
    probabilities = np.linspace(1.0, 0.0, count)
    quantiles = np.quantile(confidence, probabilities, method="inverted_cdf")  # sample values
    values = np.unique(np.concatenate([quantiles, [0.0]]))[::-1]  # descending
    return np.concatenate([[NEVER], values])


def _evaluate(
    conf: Array,
    relative: Array,
    vectors: Array,
    exit_cost: Array,
    head_cost: Array | None,
) -> tuple[Array, Array]:
    """Mean risks (R, M) and mean cost (M,) of vectors (M, L-1) on one part of the data."""
    exits = _vector_exits(conf, vectors)  # (M, n)
    samples = np.arange(conf.shape[0])[None, :]  # (1, n)
    risks = relative[:, samples, exits].mean(axis=-1)  # (R, M)
    cost = configuration_costs(exits, vectors, exit_cost, head_cost).mean(axis=-1)  # (M,)
    return risks, cost


def coordinate_curve(
    conf: Array,
    relative: Array,
    exit_cost: Array,
    head_cost: Array | None,
    vector: Array,
    exit_: int,
    options: Array,
) -> tuple[Array, Array]:
    """Mean risks (R, G) and cost (G,) when one exit's threshold takes each of ``options``.

    The other thresholds of ``vector`` (L-1,) stay fixed. Equal to evaluating the G vectors
    one by one (:func:`exitguard.risk.configurations.evaluate_vectors`), but computed from
    one sort of the samples that reach the exit: with the exit disabled, every sample has a
    base exit; a threshold ``v`` moves the samples that reach the exit with confidence
    ``>= v`` there, so every risk and the cost are cumulative sums along the confidences.
    """
    n = conf.shape[0]
    base_vector = vector.copy()
    base_vector[exit_] = NEVER
    base_exits = _vector_exits(conf, base_vector[None, :])[0]  # (n,)
    base_loss = relative[:, np.arange(n), base_exits]  # (R, n)
    base_cost = configuration_costs(base_exits[None], base_vector[None], exit_cost, head_cost)[0]
    reach = np.flatnonzero(base_exits > exit_)  # samples that pass the exit
    order = reach[np.argsort(-conf[reach, exit_], kind="stable")]  # (u,) confidence descending
    head = 0.0 if head_cost is None else float(head_cost[exit_])
    disabled = 0.0
    if head_cost is not None:
        disabled = float(head_cost[:exit_][np.isinf(vector[:exit_])].sum())
    here = float(exit_cost[exit_]) - disabled  # cost of leaving at the exit
    moved_loss = relative[:, order, exit_] - base_loss[:, order]  # (R, u)
    moved_cost = here - (base_cost[order] + head)  # (u,)
    cumulative_loss = np.concatenate(
        [np.zeros((len(relative), 1)), np.cumsum(moved_loss, axis=1)], axis=1
    )  # (R, u+1)
    cumulative_cost = np.concatenate([[0.0], np.cumsum(moved_cost)])  # (u+1,)
    count = np.searchsorted(-conf[order, exit_], -options, side="right")  # (G,) conf >= v
    enabled = np.isfinite(options)  # (G,) an enabled exit's head runs for every passing sample
    risks = (base_loss.sum(axis=1)[:, None] + cumulative_loss[:, count]) / n  # (R, G)
    costs = (base_cost.sum() + enabled * head * len(reach) + cumulative_cost[count]) / n  # (G,)
    return risks, costs


def _greedy_path(
    conf: Array,
    relative: Array,
    exit_cost: Array,
    head_cost: Array | None,
    levels: Sequence[Array],
    eps: Array,
    *,
    steps: tuple[int, ...],
    weights: Array,
    noise: float,
    max_risk_ratio: float,
    rng: np.random.Generator,
) -> Array:
    """One greedy path from the full model; returns the vectors it visits (P, L-1).

    Each move lowers one exit's threshold by one of ``steps`` levels; all moves are evaluated
    at once and the one with the most cost saved per unit of weighted, epsilon-normalised
    risk added wins (moves that add no risk win by the cost they save).
    """
    n_thresholds = len(levels)
    top = np.array([len(level) - 1 for level in levels])  # (L-1,) last level index
    position = np.zeros(n_thresholds, dtype=np.int64)  # level index per exit; 0 = inf
    vector = np.full(n_thresholds, NEVER)
    full = np.full((1, n_thresholds), NEVER)
    risk_now, cost_now = _evaluate(conf, relative, full, exit_cost, head_cost)
    risk, cost = risk_now[:, 0], float(cost_now[0])
    floor = 1e-9 / max(1, conf.shape[0])
    visited = []
    # A loop over moves: each move depends on the previous one (a path), but evaluates
    # every candidate move at once.
    for _ in range(int(top.sum())):
        moves = sorted(
            {
                (exit_, min(int(position[exit_]) + step, int(top[exit_])))
                for exit_ in range(n_thresholds)  # the few exits and step sizes
                for step in steps
                if position[exit_] < top[exit_]
            }
        )
        if not moves:
            break
        move_exits = np.array([e for e, _ in moves])  # (C,)
        options = np.array([levels[e][t] for e, t in moves])  # (C,) C small lookups
        risks = np.empty((len(eps), len(moves)))
        costs = np.empty(len(moves))
        for exit_ in np.unique(move_exits):  # one curve per exit (the few exits)
            rows = np.flatnonzero(move_exits == exit_)
            risks[:, rows], costs[rows] = coordinate_curve(
                conf, relative, exit_cost, head_cost, vector, int(exit_), options[rows]
            )
        saved = cost - costs  # (C,)
        added = (((risks - risk[:, None]) / eps[:, None]) * weights[:, None]).max(axis=0)
        useful = saved > 1e-12 * max(1.0, abs(cost))
        if not useful.any():
            break  # no move changes the optimisation part any more
        score = np.log(np.where(useful, saved, 1.0)) - np.log(np.maximum(added, floor))
        if noise > 0:
            score = score + noise * rng.standard_normal(len(score))
        score = np.where(useful, score, -np.inf)
        best = int(np.argmax(score))
        exit_, target = moves[best]
        position[exit_] = target
        vector = vector.copy()
        vector[exit_] = options[best]
        risk, cost = risks[:, best], float(costs[best])
        visited.append(vector)
        if np.max(risk / eps) > max_risk_ratio:
            break
    return np.array(visited).reshape(-1, n_thresholds)


def _descend(
    conf: Array,
    read: Array,
    exit_cost: Array,
    head_cost: Array | None,
    levels: Sequence[Array],
    penalty: Array,
    start: Array,
    *,
    full_cost: float,
    sweeps: int,
) -> Array:
    """Coordinate descent on ``cost / full_cost + penalty @ risks`` from ``start`` (L-1,).

    Each step tries every level of one exit's threshold at once (the others fixed) and keeps
    the best; sweeps over the exits until nothing changes. Returns the vectors after each
    change (P, L-1).
    """
    vector = start.copy()
    visited = []
    # Loops over sweeps and the few exits: coordinate descent is sequential by nature.
    for _ in range(sweeps):
        changed = False
        for exit_ in range(len(levels)):
            options = np.append(levels[exit_], vector[exit_])  # (G+1,) the current one last
            risks, costs = coordinate_curve(
                conf, read, exit_cost, head_cost, vector, exit_, options
            )
            objective = costs / full_cost + penalty @ risks  # (G+1,)
            best = int(np.argmin(objective))  # ties: the highest threshold (levels descend)
            if objective[best] < objective[-1] - 1e-12:
                vector = vector.copy()
                vector[exit_] = options[best]
                visited.append(vector)
                changed = True
        if not changed:
            break
    return np.array(visited).reshape(-1, len(levels))


def search_vectors(
    confidences: Array,
    relative_per_exit: Array,
    *,
    target_risks: Array,
    exit_cost: Array,
    head_cost: Array | None = None,
    settings: VectorSearch | None = None,
    rng: np.random.Generator | int | None = None,
) -> Array:
    """Candidate threshold vectors found by the search; returns (M, L - 1), deduplicated.

    Parameters
    ----------
    confidences : array (n, L)
        Confidences of the optimisation part.
    relative_per_exit : array (R, n, L)
        Loss of leaving at each exit minus the last exit's, for each risk (smoothed or not).
    target_risks : array (R,)
        Epsilon of each risk (the scale of each risk in the search).
    exit_cost, head_cost : arrays (L,)
        As in :func:`exitguard.risk.configurations.evaluate_vectors`.
    settings : VectorSearch, optional
    rng : numpy Generator or int
        Randomness of the restarts.

    The candidates are

    * the grids of ``settings.families`` (the scalar threshold among them);
    * for each of ``settings.multipliers`` multipliers ``mu`` (geometric from 0.01 to 100),
      the vectors visited by coordinate descent on ``cost / full_cost + mu * sum_r w_r
      risk_r / epsilon_r`` (every level of one exit tried at once), started from the best
      family configuration for that objective and from the previous multiplier's solution;
      with equal weights ``w``, then ``settings.restarts`` times with random weights
      (log-normal, ``settings.noise``) and a jittered start;
    * unless ``settings.greedy`` is False, the vectors visited by ``1 + settings.restarts``
      greedy paths from the full model,
      each move lowering one exit's threshold by one of ``settings.steps`` levels, choosing
      the most cost saved per unit of weighted, epsilon-normalised risk added (the restarts
      with random weights and noisy scores).

    The full model (all ``inf``) is not among them.
    """
    search = settings if settings is not None else VectorSearch()
    generator = np.random.default_rng(rng)
    n_exits = confidences.shape[1]
    eps = np.asarray(target_risks, dtype=np.float64)
    levels = [_levels(confidences[:, e], search.levels) for e in range(n_exits - 1)]
    found = []
    pooled = confidences[:, :-1].ravel()
    scalar = np.unique(
        np.quantile(pooled, np.linspace(1.0, 0.0, search.scalar_levels), method="inverted_cdf")
    )[::-1]  # (G,) strictly decreasing sample values
    for family in search.families:  # the few families
        found.append(family.vectors(scalar, n_exits)[1:])  # without the full model
    family_vectors = np.concatenate(found, axis=0)  # (Q, L-1)
    family_risks, family_cost = _evaluate(
        confidences, relative_per_exit, family_vectors, exit_cost, head_cost
    )
    full = np.full((1, n_exits - 1), NEVER)
    full_cost = float(_evaluate(confidences, relative_per_exit, full, exit_cost, head_cost)[1][0])
    full_cost = full_cost if full_cost > 0 else 1.0
    multipliers = np.geomspace(0.01, 100.0, search.multipliers)
    # A loop over the few restarts, then over multipliers: each descent is sequential.
    for restart in range(1 + search.restarts):
        plain = restart == 0
        weights = np.ones(len(eps))
        if not plain:
            weights = np.exp(search.noise * generator.standard_normal(len(eps)))
        previous = None
        for mu in multipliers:
            penalty = mu * weights / eps  # (R,)
            objective = family_cost / full_cost + penalty @ family_risks  # (Q,)
            starts = [family_vectors[int(np.argmin(objective))]]
            if previous is not None:
                starts.append(previous)
            for start in starts:  # one or two starting points
                begin = start.copy()
                if not plain:  # jitter: move each finite threshold by a few levels
                    for exit_ in range(n_exits - 1):  # the few exits
                        at = np.searchsorted(-levels[exit_], -begin[exit_])
                        shift = int(generator.integers(-2, 3))
                        moved = int(np.clip(at + shift, 0, len(levels[exit_]) - 1))
                        begin[exit_] = levels[exit_][moved]
                path = _descend(
                    confidences,
                    relative_per_exit,
                    exit_cost,
                    head_cost,
                    levels,
                    penalty,
                    begin,
                    full_cost=full_cost,
                    sweeps=search.sweeps,
                )
                found.append(path)
                if len(path):
                    previous = path[-1]
        if not search.greedy:
            continue
        found.append(
            _greedy_path(
                confidences,
                relative_per_exit,
                exit_cost,
                head_cost,
                levels,
                eps,
                steps=tuple(search.steps),
                weights=weights,
                noise=0.0 if plain else search.noise,
                max_risk_ratio=search.max_risk_ratio,
                rng=generator,
            )
        )
    candidates = np.concatenate(found, axis=0)  # (M, L-1)
    candidates = candidates[~np.all(np.isinf(candidates), axis=1)]
    _, first = np.unique(candidates, axis=0, return_index=True)
    return candidates[np.sort(first)]


# --------------------------------------------------------------------------------- result


def _vector_to_json(vector: Sequence[float]) -> list[float | str]:
    return ["never" if math.isinf(v) else float(v) for v in vector]


def _vector_from_json(values: Sequence[float | str]) -> tuple[float, ...]:
    return tuple(math.inf if v == "never" else float(v) for v in values)


@dataclasses.dataclass(frozen=True, repr=False)
class ParetoSelection:
    """Outcome of Pareto Testing (:func:`pareto_test`, :func:`pareto_test_table`).

    Attributes
    ----------
    thresholds : tuple of float or None
        The chosen threshold vector (one per exit but the last; ``inf`` disables an exit; all
        ``inf`` is the full model), or None for a table without threshold vectors.
    index : int
        Position of the chosen configuration in ``front`` (0 = the full model).
    certified : bool
        False when nothing was certified and the full model is returned.
    risk_names : tuple of str
    target_risks, loss_bounds : tuple of float
        Epsilon and B of each risk.
    delta : float
    procedure : str
        The fixed-sequence procedure whose p-values were tested (a name of
        :data:`PARETO_PROCEDURES`, e.g. ``"ucb-wsr"`` or ``"ltt"``).
    p_values, empirical_risks : tuple of float
        Per risk, the chosen configuration's p-value and mean loss on the testing part.
    upper_bounds : tuple of float or None
        Per risk, the upper confidence bound on the chosen configuration's risk from the
        testing part in the same reading order (UCB procedures; None otherwise).
    expected_cost, full_cost : float
        Mean cost of the chosen configuration and of the full model (``cost_estimate`` data).
    cost_estimate : {"all", "test"}
        The data the costs are estimated on: all calibration samples or the testing part.
    front : tuple of tuples of float, or None
        The Pareto front's threshold vectors in testing order; ``front[0]`` is the full model.
    front_rows : tuple of int or None
        Rows of the candidate table of the front entries (:func:`pareto_test_table`).
    front_risks : tuple of tuples of float
        (F, R) empirical risks on the optimisation part (on all samples for
        ``order="natural"``), which set the order.
    front_cost : tuple of float
        (F,) mean cost on the optimisation part (on all samples for ``order="natural"``).
    front_p_values : tuple of tuples of float
        (F, R) p-values on the testing part.
    n_certified : int
        Length of the passing run (front entries ``1 .. n_certified`` are certified).
    n_opt, n_test : int
        Sizes of the optimisation and testing parts (``n_opt = 0`` for ``order="natural"``).
    opt_fraction : float
        Share of the calibration samples in the optimisation part (0 when there is none).
    opt_source : {"split", "external", "none"}
        Where the order came from: a split of the calibration data, an external optimisation
        set (all calibration samples tested), or nowhere (``order="natural"``).
    n_candidates : int
        Configurations the search evaluated on the optimisation part.
    order : {"pareto", "natural"}
    seed : int
        Seed of the split, the reading order and the search: repeats the calibration exactly.
    """

    thresholds: tuple[float, ...] | None
    index: int
    certified: bool
    risk_names: tuple[str, ...]
    target_risks: tuple[float, ...]
    loss_bounds: tuple[float, ...]
    delta: float
    procedure: str
    p_values: tuple[float, ...]
    empirical_risks: tuple[float, ...]
    upper_bounds: tuple[float, ...] | None
    expected_cost: float
    full_cost: float
    cost_estimate: str
    front: tuple[tuple[float, ...], ...] | None
    front_rows: tuple[int, ...] | None
    front_risks: tuple[tuple[float, ...], ...]
    front_cost: tuple[float, ...]
    front_p_values: tuple[tuple[float, ...], ...]
    n_certified: int
    n_opt: int
    n_test: int
    opt_fraction: float
    opt_source: str
    n_candidates: int
    order: str
    seed: int

    @property
    def n(self) -> int:
        """Number of calibration samples (both parts)."""
        return self.n_opt + self.n_test

    @property
    def is_full_model(self) -> bool:
        return self.index == 0

    @property
    def row(self) -> int | None:
        """Row of the candidate table that was chosen (:func:`pareto_test_table`), else None."""
        return None if self.front_rows is None else self.front_rows[self.index]

    @property
    def relative_saving(self) -> float:
        """``1 - expected_cost / full_cost``."""
        return 1.0 - self.expected_cost / self.full_cost if self.full_cost else 0.0

    @property
    def guarantee(self) -> str:
        """The guarantee in words."""
        risks = " and ".join(
            f"R[{name}] <= {eps:g}"
            for name, eps in zip(self.risk_names, self.target_risks, strict=True)
        )
        how = (
            "Pareto Testing: order learnt on an optimisation split, fixed-sequence testing on "
            "the rest"
            if self.order == "pareto"
            else "fixed-sequence testing along the natural order"
        )
        return (
            f"P({risks}) >= {1 - self.delta:g} over calibration sets ({how}, "
            f"{self.procedure} p-values; needs i.i.d. calibration and test data)"
        )

    def __repr__(self) -> str:
        vector = (
            "None"
            if self.thresholds is None
            else "("
            + ", ".join("inf" if math.isinf(v) else f"{v:.4g}" for v in self.thresholds)
            + ")"
        )
        risks = ", ".join(
            f"{name}={risk:.4g}/{eps:g}"
            for name, risk, eps in zip(
                self.risk_names, self.empirical_risks, self.target_risks, strict=True
            )
        )
        return (
            f"ParetoSelection(thresholds={vector}, certified={self.certified}, index={self.index}"
            f"/{len(self.front_cost)}, risks[{risks}], saving={100 * self.relative_saving:.1f}%, "
            f"n_opt={self.n_opt}, n_test={self.n_test}, delta={self.delta:g}, "
            f"procedure={self.procedure!r})"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``inf`` thresholds written as ``"never"``)."""
        data = dataclasses.asdict(self)
        if self.thresholds is not None:
            data["thresholds"] = _vector_to_json(self.thresholds)
        if self.front is not None:
            data["front"] = [_vector_to_json(v) for v in self.front]
        for name in ("front_risks", "front_p_values"):
            data[name] = [list(row) for row in data[name]]
        for name in ("risk_names", "target_risks", "loss_bounds", "p_values", "empirical_risks"):
            data[name] = list(data[name])
        if self.upper_bounds is not None:
            data["upper_bounds"] = list(self.upper_bounds)
        data["front_cost"] = list(self.front_cost)
        if self.front_rows is not None:
            data["front_rows"] = list(self.front_rows)
        return {"schema": "exitguard.ParetoSelection", "schema_version": 2, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParetoSelection:
        if data.get("schema") != "exitguard.ParetoSelection":
            raise ValueError(f"not an exitguard Pareto selection: schema {data.get('schema')!r}.")
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = fields - set(data)
        if missing:
            raise ValueError(f"Pareto selection is missing fields {sorted(missing)}.")
        values = {k: data[k] for k in fields}
        if values["thresholds"] is not None:
            values["thresholds"] = _vector_from_json(values["thresholds"])
        if values["front"] is not None:
            values["front"] = tuple(_vector_from_json(v) for v in values["front"])
        if values["front_rows"] is not None:
            values["front_rows"] = tuple(int(r) for r in values["front_rows"])
        for name in ("front_risks", "front_p_values"):
            values[name] = tuple(tuple(float(x) for x in row) for row in values[name])
        for name in ("target_risks", "loss_bounds", "p_values", "empirical_risks", "front_cost"):
            values[name] = tuple(float(x) for x in values[name])
        values["risk_names"] = tuple(str(x) for x in values["risk_names"])
        if values["upper_bounds"] is not None:
            values["upper_bounds"] = tuple(float(x) for x in values["upper_bounds"])
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> ParetoSelection:
        return cls.from_dict(json.loads(text))


# ------------------------------------------------------------------------ shared plumbing


def _fresh_seed(seed: int | None) -> int:
    if seed is None:
        return int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> np.uint64(11))
    return check_int(seed, "seed", minimum=0)


def _target_risks(target_risks: float | Sequence[float], n_risks: int) -> Array:
    eps = check_open_unit_list(target_risks, "target_risks")
    if eps.shape == (1,) and n_risks > 1:
        eps = np.full(n_risks, eps[0])
    if eps.shape != (n_risks,):
        raise ValueError(
            f"`target_risks` must be one epsilon or one per risk ({n_risks}); got {len(eps)}."
        )
    return eps


def _risk_names(names: Sequence[str] | None, n_risks: int) -> tuple[str, ...]:
    if names is None:
        return tuple(f"risk_{r}" for r in range(n_risks))
    labels = (names,) if isinstance(names, str) else tuple(names)
    if len(labels) != n_risks or not all(isinstance(x, str) for x in labels):
        raise ValueError(f"`risk_names` must hold one name per risk ({n_risks}); got {names!r}.")
    return labels


def _split_sizes(n: int, opt_fraction: float) -> int:
    fraction = check_open_unit(opt_fraction, "opt_fraction")
    n_opt = round(fraction * n)
    if n_opt < 1 or n - n_opt < 1:
        raise ValueError(
            f"`opt_fraction` {fraction:g} of n={n} leaves an empty part (optimisation {n_opt}, "
            f"testing {n - n_opt}); both need at least one sample."
        )
    return n_opt


@dataclasses.dataclass(frozen=True)
class _Tested:
    """The fixed-sequence outcome along an ordered front (internal)."""

    p_values: Array  # (R, F) testing part
    risks: Array  # (R, F) testing part
    n_certified: int
    index: int
    cost: Array  # (F,) cost estimate
    upper_bounds: Array | None  # (R,) of the chosen entry (UCB procedures)
    target_risks: Array  # (R,) what was tested: eps, loss bounds, delta, procedure
    loss_bounds: Array  # (R,)
    delta: float
    procedure: Procedure
    n_test: int  # testing samples


def _test_front(
    losses: Array,
    cost: Array,
    *,
    eps: Array,
    loss_bounds: Array,
    procedure: Procedure,
    delta: float,
) -> _Tested:
    """Fixed-sequence test of an ordered front; losses (R, F, n_test) read in the given order.

    ``cost`` (F,) is the cost estimate used to choose among certified entries; entry 0 is
    the full model, never tested.
    """
    p_values = p_value_table(
        losses, eps, procedure=procedure, delta=delta, loss_bounds=loss_bounds
    )  # (R, F)
    n_certified = fixed_sequence(p_values[:, 1:], delta=delta, procedure=procedure)
    index = 0
    if n_certified > 0:
        certified_cost = cost[1 : n_certified + 1]
        # The cheapest; among equal costs the last in the order (the end of the run).
        index = int(n_certified - np.argmin(certified_cost[::-1]))
    upper = None
    if procedure.reports_upper_bound:
        # The chosen entry's bound per risk (the few risks), from the same samples and order.
        upper = np.array(
            [
                float(
                    procedure.upper_bound(
                        losses[r, index], delta=delta, loss_bound=float(loss_bounds[r])
                    )
                )
                for r in range(losses.shape[0])
            ]
        )
    return _Tested(
        p_values,
        losses.mean(axis=-1),
        n_certified,
        index,
        cost,
        upper,
        target_risks=eps,
        loss_bounds=loss_bounds,
        delta=delta,
        procedure=procedure,
        n_test=losses.shape[-1],
    )


def _check_procedure(
    procedure: str | Procedure, losses: Array | None = None, loss_bounds: Array | None = None
) -> Procedure:
    """The procedure, checked for Pareto Testing; with ``losses`` (R, K, n) and their
    ``loss_bounds`` (R,), also checked against the whole table before any split."""
    chosen = get_procedure(procedure)
    if chosen.name not in PARETO_PROCEDURES:
        allowed = ", ".join(repr(p) for p in PARETO_PROCEDURES)
        raise ValueError(
            f"`procedure` must be a fixed-sequence p-value procedure ({allowed}); got "
            f"{chosen.name!r}."
        )
    if losses is not None and loss_bounds is not None:
        # A loop over the few risks: each has its own loss bound.
        for r in range(losses.shape[0]):
            try:
                chosen.check_losses(losses[r], float(loss_bounds[r]))
            except ValueError as error:
                raise ValueError(f"risk {r}: {error}") from error
    return chosen


def _warn_nothing(tested: _Tested) -> None:
    warnings.warn(
        "Pareto Testing certified no configuration at "
        f"target_risks={tested.target_risks.tolist()}, delta={tested.delta:g} with "
        f"{tested.n_test} testing samples: using the full model. More calibration data, a "
        "larger target risk or a smaller `opt_fraction` may help.",
        NothingCertifiedWarning,
        stacklevel=3,
    )


# ------------------------------------------------------------------------------ the API


def pareto_test(
    confidences: ArrayLike,
    per_exit_losses: ArrayLike,
    *,
    target_risks: float | Sequence[float],
    delta: float = 0.1,
    loss_bounds: float | Sequence[float] = 1.0,
    exit_cost: ArrayLike | None = None,
    head_cost: ArrayLike | None = None,
    procedure: str | Procedure = "ucb-wsr",
    opt_fraction: float = 0.25,
    search: VectorSearch | None = None,
    cost_estimate: str = "all",
    risk_names: Sequence[str] | None = None,
    opt_confidences: ArrayLike | None = None,
    opt_per_exit_losses: ArrayLike | None = None,
    seed: int | None = None,
) -> ParetoSelection:
    """Certify a per-exit threshold vector for one or several risks with Pareto Testing.

    Parameters
    ----------
    confidences : array of shape (n, L)
        Confidence of each calibration sample at each exit, in [0, 1].
    per_exit_losses : array of shape (R, n, L) or (n, L)
        Absolute loss of each exit for each sample and risk, in ``[0, loss_bounds[r]]``; the
        loss of a configuration is the loss at the exit taken minus the last exit's. For an
        exceedance risk pass :func:`exitguard.risk.tail.exceedance_per_exit` (bound 1).
    target_risks : float or sequence of floats in (0, 1)
        Epsilon of each risk (one float for all).
    delta : float in (0, 1)
        Allowed probability that any risk of the chosen configuration exceeds its epsilon.
    loss_bounds : float or sequence of floats
        B of each risk (1 for 0-1 losses, 2 for Brier summed over classes).
    exit_cost : array (L,), optional
        Cost of leaving at each exit with every head on the way run (e.g. FLOPs); default:
        the 1-based exit number.
    head_cost : array (L,), optional
        Cost of each exit head; heads of disabled exits are then not charged (the all-``inf``
        full model costs the backbone and the last head).
    procedure : str or Procedure
        The fixed-sequence procedure of the test (one of :data:`PARETO_PROCEDURES`; aliases
        such as ``"ucb"`` work): ``"ucb-wsr"`` (the default; WSR reads the testing part in
        the seeded random order of the split), ``"ltt"`` (Hoeffding-Bentkus),
        ``"ucb-hb"``, ``"ucb-hoeffding"`` or ``"ucb-binomial"`` (0-1 losses).
    opt_fraction : float in (0, 1)
        Share of the calibration samples in the optimisation part (the search and the
        order); the rest is the testing part. Default 0.25: in ``benchmarks/pareto.py`` a
        quarter did better than the paper's half in every case measured (the larger
        testing part certifies more; on segmentation 3 to 39% fewer FLOPs).
    search : VectorSearch, optional
        Settings of the search (default: ``VectorSearch()``).
    cost_estimate : {"all", "test"}
        Data on which the certified configurations' costs are compared: all calibration
        samples (default, lowest variance) or the testing part. Either keeps the guarantee
        (see the module docstring).
    risk_names : sequence of str, optional
    opt_confidences, opt_per_exit_losses : arrays (m, L) and (R, m, L), optional
        An external optimisation set: when given, the search and the order read it, there is
        no split, and all ``n`` calibration samples are the testing part. It must be
        independent of the calibration and test data (e.g. other unlabeled samples scored
        with a label-free risk, or the training set); it need not follow their distribution
        (a biased set only makes the order less efficient, never invalid).
    seed : int, optional
        Seeds the split, the reading order and the search; default fresh entropy, recorded.

    Returns
    -------
    ParetoSelection

    Warns
    -----
    NothingCertifiedWarning
        When nothing is certified (the full model is returned, ``certified=False``).

    Notes
    -----
    Guarantee (see :mod:`exitguard.risk.pareto`): for i.i.d. calibration and test data,
    ``P(R_r(chosen) > epsilon_r for some r) <= delta`` over the calibration draw, the split
    and the reading order; no monotonicity is needed.
    """
    conf = check_unit_scores(confidences, "confidences", ndim=2)  # (n, L)
    n, n_exits = conf.shape
    check_int(n_exits, "confidences.shape[1] (the number of exits)", minimum=2)
    n_risks = np.shape(per_exit_losses)[0] if np.ndim(per_exit_losses) == 3 else 1
    bounds_ = as_loss_bounds(loss_bounds, n_risks)
    per_exit = check_per_exit_losses(
        per_exit_losses, n=n, n_exits=n_exits, loss_bounds=bounds_
    )  # (R, n, L)
    eps = _target_risks(target_risks, n_risks)
    level = check_open_unit(delta, "delta")
    costs = check_exit_cost(exit_cost, n_exits)  # (L,)
    heads = None if head_cost is None else check_head_cost(head_cost, n_exits)
    chosen = _check_procedure(procedure, per_exit.transpose(0, 2, 1), bounds_)
    check_choice(cost_estimate, "cost_estimate", COST_ESTIMATES)
    names = _risk_names(risk_names, n_risks)
    settings = search if search is not None else VectorSearch()
    if not isinstance(settings, VectorSearch):
        raise TypeError(f"`search` must be a VectorSearch; got {type(settings).__name__}.")
    used_seed = _fresh_seed(seed)
    relative = per_exit - per_exit[:, :, -1:]  # (R, n, L)
    # 1. Split: a seeded uniform permutation of the samples as given (see the module notes).
    order = np.random.default_rng(used_seed).permutation(n)  # (n,)
    if opt_confidences is None and opt_per_exit_losses is None:
        n_opt = _split_sizes(n, opt_fraction)
        opt, test = order[:n_opt], order[n_opt:]  # test kept in the random reading order
        opt_conf, opt_relative = conf[opt], relative[:, opt]
        fraction, source = opt_fraction, "split"
    elif opt_confidences is None or opt_per_exit_losses is None:
        raise ValueError(
            "`opt_confidences` and `opt_per_exit_losses` go together (an external optimisation "
            "set); got only one of them."
        )
    else:
        opt_conf = check_unit_scores(opt_confidences, "opt_confidences", ndim=2)
        if opt_conf.shape[1] != n_exits or opt_conf.shape[0] < 1:
            raise ValueError(
                f"`opt_confidences` must have shape (m, {n_exits}) with m >= 1; got "
                f"{opt_conf.shape}."
            )
        opt_per_exit = check_per_exit_losses(
            opt_per_exit_losses, n=opt_conf.shape[0], n_exits=n_exits, loss_bounds=bounds_
        )
        opt_relative = opt_per_exit - opt_per_exit[:, :, -1:]
        test, fraction, source = order, 0.0, "external"
    n_opt = opt_conf.shape[0]

    # 2. Search and front on the optimisation part (smoothed losses; see VectorSearch).
    read = smooth_losses(opt_conf, opt_relative, smoothing=settings.smoothing)
    candidates = search_vectors(
        opt_conf,
        read,
        target_risks=eps,
        exit_cost=costs,
        head_cost=heads,
        settings=settings,
        rng=np.random.default_rng([used_seed, 1]),
    )  # (M, L-1)
    opt_risks, opt_cost = _evaluate(opt_conf, read, candidates, costs, heads)
    points = np.concatenate([opt_risks.T, opt_cost[:, None]], axis=1)  # (M, R+1)
    _, distinct = np.unique(points, axis=0, return_index=True)
    distinct = np.sort(distinct)  # one vector per point: the first found
    on_front = distinct[pareto_front(points[distinct])]  # (F-1,)

    # 3. Order from the safest, on the optimisation part only.
    front_exits = _vector_exits(opt_conf, candidates[on_front])  # (F-1, n_opt)
    raw = opt_relative[:, np.arange(n_opt)[None, :], front_exits]  # (R, F-1, n_opt)
    ranked = on_front[
        order_front(
            opt_risks[:, on_front],
            opt_cost[on_front],
            target_risks=eps,
            scales=loss_scales(raw),
        )
    ]
    full = np.full((1, n_exits - 1), NEVER)
    front = np.concatenate([full, candidates[ranked]])  # (F, L-1)
    full_risk, full_cost = _evaluate(opt_conf, read, full, costs, heads)
    front_risks = np.concatenate([full_risk, opt_risks[:, ranked]], axis=1)  # (R, F)
    front_cost = np.concatenate([full_cost, opt_cost[ranked]])  # (F,)

    # 4. Fixed-sequence testing on the testing part, read in the random order.
    exits = _vector_exits(conf[test], front)  # (F, n_test)
    samples = np.arange(len(test))[None, :]
    test_losses = relative[:, test][:, samples, exits]  # (R, F, n_test)
    if cost_estimate == "all":  # every calibration sample (not an external optimisation set)
        estimate = configuration_costs(_vector_exits(conf, front), front, costs, heads).mean(-1)
    else:
        estimate = configuration_costs(exits, front, costs, heads).mean(-1)
    tested = _test_front(
        test_losses, estimate, eps=eps, loss_bounds=bounds_, procedure=chosen, delta=level
    )
    if tested.n_certified == 0:
        _warn_nothing(tested)
    return _selection(
        tested,
        thresholds=tuple(float(v) for v in front[tested.index]),
        front=tuple(tuple(float(v) for v in row) for row in front),
        front_rows=None,
        front_risks=front_risks,
        front_cost=front_cost,
        names=names,
        cost_estimate=cost_estimate,
        n_opt=n_opt,
        opt_fraction=float(fraction),
        opt_source=source,
        n_candidates=len(candidates),
        order="pareto",
        seed=used_seed,
    )


def _selection(
    tested: _Tested,
    *,
    thresholds: tuple[float, ...] | None,
    front: tuple[tuple[float, ...], ...] | None,
    front_rows: tuple[int, ...] | None,
    front_risks: Array,
    front_cost: Array,
    names: tuple[str, ...],
    cost_estimate: str,
    n_opt: int,
    opt_fraction: float,
    opt_source: str,
    n_candidates: int,
    order: str,
    seed: int,
) -> ParetoSelection:
    index = tested.index
    return ParetoSelection(
        thresholds=thresholds,
        index=index,
        certified=tested.n_certified > 0,
        risk_names=names,
        target_risks=tuple(float(e) for e in tested.target_risks),
        loss_bounds=tuple(float(b) for b in tested.loss_bounds),
        delta=tested.delta,
        procedure=tested.procedure.name,
        p_values=tuple(float(p) for p in tested.p_values[:, index]),
        empirical_risks=tuple(float(r) for r in tested.risks[:, index]),
        upper_bounds=None
        if tested.upper_bounds is None
        else tuple(float(u) for u in tested.upper_bounds),
        expected_cost=float(tested.cost[index]),
        full_cost=float(tested.cost[0]),
        cost_estimate=cost_estimate,
        front=front,
        front_rows=front_rows,
        front_risks=tuple(tuple(float(x) for x in col) for col in front_risks.T),
        front_cost=tuple(float(c) for c in front_cost),
        front_p_values=tuple(tuple(float(x) for x in col) for col in tested.p_values.T),
        n_certified=tested.n_certified,
        n_opt=n_opt,
        n_test=tested.n_test,
        opt_fraction=opt_fraction,
        opt_source=opt_source,
        n_candidates=n_candidates,
        order=order,
        seed=seed,
    )


def pareto_test_table(
    losses: ArrayLike,
    *,
    target_risks: float | Sequence[float],
    cost: ArrayLike,
    delta: float = 0.1,
    loss_bounds: float | Sequence[float] = 1.0,
    procedure: str | Procedure = "ucb-wsr",
    order: Literal["pareto", "natural"] = "pareto",
    opt_fraction: float = 0.25,
    cost_estimate: str = "all",
    thresholds: ArrayLike | None = None,
    risk_names: Sequence[str] | None = None,
    seed: int | None = None,
) -> ParetoSelection:
    """Pareto Testing (or natural-order testing) on a precomputed configuration table.

    Parameters
    ----------
    losses : array of shape (R, K, n) or (K, n)
        ``losses[r, k, i]``: loss of sample ``i`` under configuration ``k`` for risk ``r``,
        relative to the full model, in ``[-loss_bounds[r], loss_bounds[r]]``. Row 0 is the
        full model and must be loss-free.
    target_risks, delta, loss_bounds, procedure, opt_fraction, cost_estimate, risk_names, seed
        As in :func:`pareto_test`.
    cost : array of shape (K,) or (K, n)
        Compute per configuration (per sample, or already averaged).
    order : {"pareto", "natural"}
        ``"pareto"``: split, front and order on the optimisation part, test on the testing
        part. ``"natural"``: the rows are already ordered from the safest (a scalar grid, a
        threshold family): no split, fixed-sequence testing of rows ``1 .. K-1`` in the
        given order on all ``n`` samples (multi-risk Learn-then-Test). The samples are read
        in the order of :func:`exitguard.risk.procedures.reading_order` seeded by ``seed``,
        exactly as :func:`exitguard.calibrate_table` reads them, so that with one risk the
        selection is that of ``calibrate_table`` with the same procedure.
    thresholds : array of shape (K, L - 1) or (K,), optional
        The configuration of each row, recorded in the result.

    Returns
    -------
    ParetoSelection
        ``front_rows`` are rows of ``losses``; ``row`` is the chosen one.
    """
    table = as_float_array(losses, "losses", ndim=(2, 3))
    if table.ndim == 2:
        table = table[None]
    n_risks, n_rows, n = table.shape
    check_int(n_rows, "losses.shape[-2] (configurations)", minimum=1)
    check_int(n, "losses.shape[-1] (calibration samples)", minimum=2)
    bounds_ = as_loss_bounds(loss_bounds, n_risks)
    worst = np.abs(table).max(axis=(1, 2))  # (R,)
    bad = np.flatnonzero(worst > bounds_ * (1 + 1e-12))
    if bad.size:
        r = int(bad[0])
        raise ValueError(
            f"`losses` of risk {r} must lie in [-{bounds_[r]:g}, {bounds_[r]:g}]; got a largest "
            f"|loss| of {worst[r]:.6g}. Pass the right `loss_bounds`."
        )
    if np.any(table[:, 0] != 0.0):
        raise ValueError(
            "`losses` row 0 must be loss-free for every risk (it is the full model, compared "
            "with itself); order rows from the full model."
        )
    costs = as_float_array(cost, "cost", ndim=(1, 2))
    if costs.shape not in ((n_rows,), (n_rows, n)):
        raise ValueError(
            f"`cost` must have shape ({n_rows},) or ({n_rows}, {n}); got {costs.shape}."
        )
    per_sample = costs if costs.ndim == 2 else np.repeat(costs[:, None], n, axis=1)  # (K, n)
    vectors = None
    if thresholds is not None:
        raw = as_float_array(thresholds, "thresholds", ndim=(1, 2), finite=False)
        if raw.shape[0] != n_rows:
            raise ValueError(
                f"`thresholds` must have one configuration per row ({n_rows}); got {raw.shape}."
            )
        vectors = raw[:, None] if raw.ndim == 1 else raw
        if np.isnan(vectors).any():
            raise ValueError("`thresholds` must not contain NaN.")
    eps = _target_risks(target_risks, n_risks)
    level = check_open_unit(delta, "delta")
    chosen = _check_procedure(procedure, table, bounds_)
    check_choice(order, "order", ORDERS)
    check_choice(cost_estimate, "cost_estimate", COST_ESTIMATES)
    names = _risk_names(risk_names, n_risks)
    used_seed = _fresh_seed(seed)

    if order == "natural":
        read = reading_order(table.reshape(n_risks * n_rows, n), np.random.default_rng(used_seed))
        rows = np.arange(n_rows)
        test_losses = table[:, :, read]  # (R, K, n) in the random reading order
        estimate = per_sample.mean(axis=-1)
        tested = _test_front(
            test_losses, estimate, eps=eps, loss_bounds=bounds_, procedure=chosen, delta=level
        )
        front_risks, front_cost, n_opt, fraction = tested.risks, estimate, 0, 0.0
    else:
        n_opt = _split_sizes(n, opt_fraction)
        split = np.random.default_rng(used_seed).permutation(n)  # (n,)
        opt, test = split[:n_opt], split[n_opt:]
        opt_risks = table[:, 1:, opt].mean(axis=-1)  # (R, K-1)
        opt_cost = per_sample[1:, opt].mean(axis=-1)  # (K-1,)
        points = np.concatenate([opt_risks.T, opt_cost[:, None]], axis=1)  # (K-1, R+1)
        _, distinct = np.unique(points, axis=0, return_index=True)
        distinct = np.sort(distinct)
        on_front = distinct[pareto_front(points[distinct])]
        ranked = on_front[
            order_front(
                opt_risks[:, on_front],
                opt_cost[on_front],
                target_risks=eps,
                scales=loss_scales(table[:, on_front + 1][:, :, opt]),
            )
        ]
        rows = np.concatenate([[0], ranked + 1])  # (F,) table rows, full model first
        test_losses = table[:, rows][:, :, test]  # (R, F, n_test), random reading order
        source = per_sample if cost_estimate == "all" else per_sample[:, test]
        estimate = source[rows].mean(axis=-1)
        tested = _test_front(
            test_losses, estimate, eps=eps, loss_bounds=bounds_, procedure=chosen, delta=level
        )
        front_risks = table[:, rows][:, :, opt].mean(axis=-1)
        front_cost = per_sample[rows][:, opt].mean(axis=-1)
        fraction = float(opt_fraction)
    if tested.n_certified == 0:
        _warn_nothing(tested)
    front = None
    chosen_vector = None
    if vectors is not None:
        front = tuple(tuple(float(v) for v in vectors[r]) for r in rows)
        chosen_vector = front[tested.index]
    return _selection(
        tested,
        thresholds=chosen_vector,
        front=front,
        front_rows=tuple(int(r) for r in rows),
        front_risks=front_risks,
        front_cost=front_cost,
        names=names,
        cost_estimate=cost_estimate,
        n_opt=n_opt,
        opt_fraction=fraction,
        opt_source="none" if order == "natural" else "split",
        n_candidates=n_rows - 1,
        order=order,
        seed=used_seed,
    )
