"""Configurations: exit policies beyond one scalar threshold, and their loss tables.

A **configuration** is one point of a policy space: a scalar threshold, a threshold *vector*
(one threshold per exit), or a threshold *function* of one scalar (a :class:`ThresholdFamily`,
e.g. a threshold decaying over the exits). Every configuration here is represented by the
threshold vector it applies, shape ``(L - 1,)`` for a network with ``L`` exits (the last exit
needs none: a sample that reaches it stops there).

**The exit rule for vectors.** Under the vector ``t`` a sample leaves at the first exit ``l``
whose confidence is ``>= t[l]``; if none, at the last exit. ``t[l] = +inf`` disables exit
``l`` (no confidence reaches it, and its head need not run), so the all-``inf`` vector is the
full model. A scalar threshold ``lambda`` is the vector ``(lambda, ..., lambda)``: with it the
rule is exactly the one of :func:`exitguard.risk.exits.exit_indices`.

**The generalised table.** Evaluating ``K`` configurations on ``n`` samples for ``R`` risks
gives

    losses[r, k, i]   loss of sample i under configuration k for risk r      (R, K, n)
    cost[k, i]        compute spent on sample i under configuration k         (K, n)

where the loss of a configuration is the per-exit *absolute* loss at the exit taken minus the
last exit's (the loss relative to the full model, as in :func:`exitguard.risk.losses.
loss_table`). The scalar grid of :func:`exitguard.build_table` is the special case ``R = 1``
with a natural order (row 0 the full model, rows growing more aggressive); every existing
procedure keeps working on ``losses[0]`` unchanged.

Everything here is vectorised over the ``M`` candidate vectors and the ``n`` samples at once
(chunked over candidates to bound memory); nothing imports torch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from exitguard.risk._validation import (
    as_float_array,
    check_choice,
    check_exit_cost,
    check_int,
    check_positive,
    check_unit_scores,
)
from exitguard.risk.exits import (
    NEVER,
    as_threshold_grid,
    check_threshold,
    check_thresholds,
    first_exit,
)

Array = NDArray[np.float64]

_CHUNK_ELEMENTS = 4_000_000  # comparisons (candidates x samples x exits) held at once


# --------------------------------------------------------------------------- validation


def check_threshold_vectors(thresholds: ArrayLike, n_exits: int) -> Array:
    """Validate threshold vectors: shape (M, L - 1) (or one vector (L - 1,)), in [0, 1] or inf.

    Each value is checked by :func:`exitguard.risk.exits.check_thresholds`. Returns a float64
    array of shape (M, L - 1).
    """
    check_int(n_exits, "n_exits", minimum=1)
    vectors = check_thresholds(thresholds, name="thresholds")
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    if vectors.ndim != 2 or vectors.shape[1] != n_exits - 1:
        raise ValueError(
            f"`thresholds` must hold one threshold per exit but the last: shape (M, {n_exits - 1})"
            f" for {n_exits} exits; got {vectors.shape}."
        )
    return vectors


def check_per_exit_losses(
    per_exit_losses: ArrayLike, *, n: int, n_exits: int, loss_bounds: Array
) -> Array:
    """Per-exit absolute losses (R, n, L) (or (n, L) for one risk), each risk in [0, B_r]."""
    losses = as_float_array(per_exit_losses, "per_exit_losses", ndim=(2, 3))
    if losses.ndim == 2:
        losses = losses[None]
    if losses.shape[1:] != (n, n_exits):
        raise ValueError(
            f"`per_exit_losses` must have shape (R, {n}, {n_exits}) (risks, samples, exits) to "
            f"match `confidences`; got {losses.shape}."
        )
    if loss_bounds.shape != (losses.shape[0],):
        raise ValueError(
            f"`loss_bounds` must hold one bound per risk ({losses.shape[0]}); got "
            f"{loss_bounds.shape[0]}."
        )
    low = losses.min(axis=(1, 2))  # (R,)
    high = losses.max(axis=(1, 2))  # (R,)
    tolerance = 1e-12 * np.maximum(1.0, loss_bounds)
    bad = np.flatnonzero((low < -tolerance) | (high > loss_bounds + tolerance))
    if bad.size:
        r = int(bad[0])
        raise ValueError(
            f"`per_exit_losses` of risk {r} must be absolute losses in [0, loss_bound] = "
            f"[0, {loss_bounds[r]:g}]; got values in [{low[r]:.6g}, {high[r]:.6g}]."
        )
    return losses


def as_loss_bounds(loss_bounds: float | ArrayLike, n_risks: int) -> Array:
    """One positive loss bound per risk: a scalar is shared by every risk; shape (R,)."""
    if np.ndim(loss_bounds) == 0:
        return np.full(n_risks, check_positive(loss_bounds, "loss_bounds"))
    bounds = as_float_array(loss_bounds, "loss_bounds", ndim=1)
    if bounds.shape != (n_risks,):
        raise ValueError(
            f"`loss_bounds` must be one float or one per risk ({n_risks}); got {bounds.shape[0]}."
        )
    for value in bounds:
        check_positive(float(value), "loss_bounds")
    return bounds


# ---------------------------------------------------------------------------- exit rule


def _vector_exits(conf: Array, vectors: Array) -> NDArray[np.int64]:
    """The exit rule on validated arrays: (n, L), (M, L - 1) -> (M, n)."""
    n, n_exits = conf.shape
    m = vectors.shape[0]
    out = np.empty((m, n), dtype=np.int64)
    per_candidate = max(1, n * max(1, n_exits - 1))
    rows = max(1, _CHUNK_ELEMENTS // per_candidate)
    # A loop over chunks of candidates only to bound memory; each chunk is fully vectorised.
    for start in range(0, m, rows):
        part = vectors[start : start + rows]  # (c, L-1)
        out[start : start + rows] = first_exit(conf[None, :, : n_exits - 1], part[:, None, :])
    return out


def vector_exit_indices(confidences: ArrayLike, thresholds: ArrayLike) -> NDArray[np.int64]:
    """Exit taken by every sample under every threshold vector.

    Parameters
    ----------
    confidences : array of shape (n, L)
        Confidence of each sample at each exit, in [0, 1]; the last exit's is ignored.
    thresholds : array of shape (M, L - 1) or (L - 1,)
        One threshold per exit but the last, in [0, 1]; ``inf`` disables an exit.

    Returns
    -------
    exits : int array of shape (M, n)
        ``exits[m, i]``: the first exit ``l`` with ``confidences[i, l] >= thresholds[m, l]``,
        else ``L - 1``.

    Examples
    --------
    >>> vector_exit_indices([[0.2, 0.9, 0.5], [0.95, 0.1, 0.3]], [[0.1, 0.5], [np.inf, 0.95]])
    array([[0, 0],
           [2, 2]])
    """
    conf = check_unit_scores(confidences, "confidences", ndim=2)  # (n, L)
    vectors = check_threshold_vectors(thresholds, conf.shape[1])  # (M, L-1)
    return _vector_exits(conf, vectors)


def scalar_vectors(thresholds: ArrayLike | None, n_exits: int) -> Array:
    """The scalar grid as threshold vectors: row ``k`` is ``(grid[k],) * (L - 1)``; (K, L-1).

    ``thresholds`` is validated (and given its leading ``inf``) as by
    :func:`exitguard.risk.exits.as_threshold_grid`.
    """
    check_int(n_exits, "n_exits", minimum=1)
    grid = as_threshold_grid(thresholds)  # (K,)
    return np.repeat(grid[:, None], n_exits - 1, axis=1)  # (K, L-1)


# ---------------------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True, repr=False)
class ConfigurationTable:
    """Losses and costs of ``K`` configurations on ``n`` samples for ``R`` risks.

    Attributes
    ----------
    losses : array (R, K, n)
        Loss of each sample under each configuration, relative to the full model, for each
        risk, in ``[-loss_bounds[r], loss_bounds[r]]``.
    cost : array (K, n)
        Compute spent on each sample under each configuration.
    exits : int array (K, n)
        Exit taken by each sample under each configuration.
    thresholds : array (K, L - 1)
        The threshold vector of each configuration (``inf``: exit disabled).
    loss_bounds : array (R,)
        B of each risk.
    """

    losses: Array
    cost: Array
    exits: NDArray[np.int64]
    thresholds: Array
    loss_bounds: Array

    @property
    def n_risks(self) -> int:
        return int(self.losses.shape[0])

    @property
    def n_configurations(self) -> int:
        return int(self.losses.shape[1])

    @property
    def n(self) -> int:
        return int(self.losses.shape[2])

    def risks(self) -> Array:
        """Empirical risk of every configuration for every risk; shape (R, K)."""
        return self.losses.mean(axis=-1)

    def mean_cost(self) -> Array:
        """Mean cost of every configuration; shape (K,)."""
        return self.cost.mean(axis=-1)

    def __repr__(self) -> str:
        return (
            f"ConfigurationTable(risks={self.n_risks}, configurations={self.n_configurations}, "
            f"n={self.n}, exits={self.thresholds.shape[1] + 1})"
        )


def configuration_costs(
    exits: NDArray[np.int64], vectors: Array, exit_cost: Array, head_cost: Array | None
) -> Array:
    """Cost of every sample under every configuration; (M, n), (M, L-1), (L,), (L,) -> (M, n).

    ``exit_cost[l]`` is the cost of a sample leaving at ``l`` when every head on the way ran.
    With ``head_cost``, the heads of disabled exits (threshold ``inf``) before the exit taken
    are not charged: they never run. The all-``inf`` vector then costs
    ``exit_cost[L-1] - sum(head_cost[:L-1])``, the backbone and the last head only.
    """
    cost = exit_cost[exits]  # (M, n)
    if head_cost is None:
        return cost
    disabled = np.isinf(vectors)  # (M, L-1)
    # saved[m, l]: heads of disabled exits before exit l (l = 0..L-1).
    saved = np.concatenate(
        [np.zeros((len(vectors), 1)), np.cumsum(disabled * head_cost[None, :-1], axis=1)], axis=1
    )  # (M, L)
    return cost - np.take_along_axis(saved, exits, axis=1)


def relative_losses(per_exit: Array, exits: NDArray[np.int64]) -> Array:
    """Loss at the exit taken minus the last exit's; (R, n, L), (M, n) -> (R, M, n)."""
    samples = np.arange(per_exit.shape[1])[None, :]  # (1, n)
    taken = per_exit[:, samples, exits]  # (R, M, n)
    return taken - per_exit[:, None, :, -1]


def evaluate_vectors(
    confidences: ArrayLike,
    per_exit_losses: ArrayLike,
    thresholds: ArrayLike,
    *,
    loss_bounds: float | ArrayLike = 1.0,
    exit_cost: ArrayLike | None = None,
    head_cost: ArrayLike | None = None,
) -> ConfigurationTable:
    """Losses, costs and exits of ``M`` threshold vectors on ``n`` samples, all at once.

    Parameters
    ----------
    confidences : array of shape (n, L)
        Confidence of each sample at each exit, in [0, 1].
    per_exit_losses : array of shape (R, n, L) or (n, L)
        Absolute loss of each exit for each sample and risk, in ``[0, loss_bounds[r]]``
        (see :func:`exitguard.risk.losses.per_exit_losses`; an exceedance risk from
        :func:`exitguard.risk.tail.exceedance_per_exit`).
    thresholds : array of shape (M, L - 1) or (L - 1,)
        The candidate vectors (``inf`` disables an exit).
    loss_bounds : float or array (R,)
        B of each risk (one float for all).
    exit_cost : array of shape (L,), optional
        Cost of leaving at each exit with every head on the way run (e.g. cumulative FLOPs);
        default: the 1-based exit number (exits evaluated).
    head_cost : array of shape (L,), optional
        Cost of each exit head; when given, heads of disabled exits are not charged (see
        :func:`configuration_costs`).

    Returns
    -------
    ConfigurationTable
        ``losses`` (R, M, n), ``cost`` (M, n), ``exits`` (M, n), ``thresholds`` (M, L - 1).
    """
    conf = check_unit_scores(confidences, "confidences", ndim=2)  # (n, L)
    n, n_exits = conf.shape
    vectors = check_threshold_vectors(thresholds, n_exits)  # (M, L-1)
    n_risks = np.shape(per_exit_losses)[0] if np.ndim(per_exit_losses) == 3 else 1
    bounds = as_loss_bounds(loss_bounds, n_risks)
    per_exit = check_per_exit_losses(per_exit_losses, n=n, n_exits=n_exits, loss_bounds=bounds)
    costs = check_exit_cost(exit_cost, n_exits)  # (L,)
    heads = None if head_cost is None else check_head_cost(head_cost, n_exits)
    exits = _vector_exits(conf, vectors)  # (M, n)
    return ConfigurationTable(
        losses=relative_losses(per_exit, exits),
        cost=configuration_costs(exits, vectors, costs, heads),
        exits=exits,
        thresholds=vectors,
        loss_bounds=bounds,
    )


def check_head_cost(head_cost: ArrayLike, n_exits: int) -> Array:
    heads = as_float_array(head_cost, "head_cost", ndim=1)
    if heads.shape != (n_exits,) or heads.min() < 0:
        raise ValueError(
            f"`head_cost` must hold one cost >= 0 per exit, shape ({n_exits},); got shape "
            f"{heads.shape} with minimum {heads.min(initial=0.0):g}."
        )
    return heads


# ------------------------------------------------------------------- threshold functions

FAMILIES = ("constant", "calm", "scaled")


@dataclasses.dataclass(frozen=True)
class ThresholdFamily:
    """A threshold function of one scalar ``lambda``: exit ``l``'s threshold is ``g(lambda, l)``.

    With ``x = l / (L - 1)`` the position of exit ``l`` along the network (0 at the first exit):

    ==========  ==============================================  ================================
    kind        threshold of exit ``l``                         meaning
    ==========  ==============================================  ================================
    constant    ``lambda``                                      the scalar threshold
    calm        ``clip(0.9 lambda + 0.1 exp(-tau x), 0, 1)``    CALM's decay (Schuster et al.,
                                                                2022), here over the exits
    scaled      ``lambda exp(-tau x)``                          later exits get a lower bar
    ==========  ==============================================  ================================

    ``lambda = inf`` is the full model (every exit disabled) in every family. Each threshold
    is non-decreasing in ``lambda``, so a decreasing ``lambda`` grid gives exits that move
    earlier sample by sample: the family has a natural order, row 0 the full model, and every
    procedure of :mod:`exitguard.risk.procedures` applies to its table as to the scalar grid.

    Attributes
    ----------
    kind : {"constant", "calm", "scaled"}
    tau : float
        Decay rate (>= 0); ignored by ``constant``.
    """

    kind: Literal["constant", "calm", "scaled"] = "constant"
    tau: float = 0.0

    def __post_init__(self) -> None:
        check_choice(self.kind, "kind", FAMILIES)
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float, np.floating)):
            raise TypeError(f"`tau` must be a float >= 0; got {self.tau!r}.")
        if not (math.isfinite(self.tau) and self.tau >= 0):
            raise ValueError(f"`tau` must be a finite float >= 0; got {self.tau!r}.")

    def vectors(self, lambdas: ArrayLike | None, n_exits: int) -> Array:
        """The threshold vectors of a ``lambda`` grid; (K,) -> (K, L - 1).

        ``lambdas`` is validated as a threshold grid (strictly decreasing, in [0, 1], a
        leading ``inf`` added when missing; None: the default grid).
        """
        check_int(n_exits, "n_exits", minimum=1)
        grid = as_threshold_grid(lambdas)  # (K,)
        position = np.arange(n_exits - 1) / max(1, n_exits - 1)  # (L-1,)
        decay = np.exp(-self.tau * position)  # (L-1,)
        finite = np.where(np.isinf(grid), 0.0, grid)[:, None]  # (K, 1)
        if self.kind == "constant":
            values = np.broadcast_to(finite, (len(grid), n_exits - 1))
        elif self.kind == "calm":
            values = np.clip(0.9 * finite + 0.1 * decay[None, :], 0.0, 1.0)
        else:
            values = finite * decay[None, :]
        return np.where(np.isinf(grid)[:, None], NEVER, values)  # (K, L-1)

    def vector(self, lam: float, n_exits: int) -> Array:
        """The threshold vector at one ``lambda`` (``inf``: the full model); shape (L - 1,).

        Examples
        --------
        >>> ThresholdFamily("scaled", tau=1.0).vector(0.8, 3).round(3)
        array([0.8  , 0.485])
        """
        value = check_threshold(lam, name="lambda")
        return self.vectors(np.array([value]), n_exits)[-1]  # the row after the leading inf

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "tau": float(self.tau)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ThresholdFamily:
        return cls(kind=data["kind"], tau=float(data["tau"]))


def family_table(
    confidences: ArrayLike,
    per_exit_losses: ArrayLike,
    *,
    family: ThresholdFamily | None = None,
    lambdas: ArrayLike | None = None,
    loss_bounds: float | ArrayLike = 1.0,
    exit_cost: ArrayLike | None = None,
    head_cost: ArrayLike | None = None,
) -> ConfigurationTable:
    """The table of a threshold family over a ``lambda`` grid (natural order, row 0 = full model).

    With ``family=ThresholdFamily("constant")`` (the default) and one risk, ``losses[0]`` and
    ``exits`` equal those of :func:`exitguard.build_table` on the same grid, so
    ``calibrate_table(table.losses[0], ...)`` is the existing scalar calibration.
    """
    conf = check_unit_scores(confidences, "confidences", ndim=2)
    chosen = family if family is not None else ThresholdFamily()
    if not isinstance(chosen, ThresholdFamily):
        raise TypeError(f"`family` must be a ThresholdFamily; got {type(chosen).__name__}.")
    vectors = chosen.vectors(lambdas, conf.shape[1])
    return evaluate_vectors(
        conf,
        per_exit_losses,
        vectors,
        loss_bounds=loss_bounds,
        exit_cost=exit_cost,
        head_cost=head_cost,
    )
