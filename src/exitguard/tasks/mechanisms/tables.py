"""Loss and cost tables of early-exit mechanisms, certified by the risk core (numpy only).

A *mechanism* is a family of configurations with one scalar parameter, ordered from the full
model (row 0) to the most aggressive, plus the code that runs a configuration with real
savings (:mod:`exitguard.nn.cascade`, :mod:`~exitguard.nn.halting`, :mod:`~exitguard.nn.anytime`,
:mod:`~exitguard.nn.skipping`). Running it on calibration data gives a :class:`MechanismTable`:

    losses[r, k, i]   loss of sample i under configuration k for risk r, against the full model
    cost[k, i]        FLOPs sample i spends under configuration k

exactly the boundary of the risk core, so :func:`certify` is :func:`exitguard.calibrate_table`
on one risk's table and :func:`evaluate_table` is :func:`exitguard.evaluate` on it.

Three shapes of family, one builder each:

- :func:`exit_rule_table` — a confidence per sample and step, and the exit rule
  (branch exits with a softmax confidence, a cascade of models, learned halting with the
  cumulative halting probability): one collection, every threshold evaluated vectorised.
- :func:`budget_table` — anytime prediction at fixed budgets: every sample answers from the
  deepest exit the budget allows, the rows are the budgets from the largest down.
- :func:`config_table` — configurations whose outputs depend on the configuration (layer
  skipping): one pass per configuration, stacked.

Families of the last shape are not *ordered* (a sample's compute need not grow along the rows,
and nothing makes the risk monotone); for them, procedures that assume a monotone risk
(``crc-marginal``) are refused and certification is by fixed-sequence testing (UCB, LTT) or
by CRC on monotonised losses, which need no monotonicity.

:func:`budget_risk_curve` gives the certified view of anytime prediction: the risk of the
answer available at each budget with an upper confidence bound, simultaneously valid over the
budgets (Bonferroni).

Everything here imports numpy and scipy only. (The policy type and the budget curve belong
with the risk core and the calibration layer; they live here until the configuration tables of
the core take them in.)
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from exitguard._files import atomic_save, read_npz
from exitguard.calibration import calibrate_table, order_seed
from exitguard.evaluation import Evaluation, evaluate
from exitguard.policy import ExitPolicy
from exitguard.risk import bounds, procedures
from exitguard.risk._validation import as_float_array, check_open_unit
from exitguard.risk.exits import as_threshold_grid, exit_indices
from exitguard.risk.losses import get_risk, loss_table, per_exit_losses

Array = NDArray[np.float64]

RISKS = ("prediction_gap", "prediction_consistency")
"""The risks the mechanisms are compared on (the builders' default)."""


@dataclasses.dataclass(frozen=True, repr=False)
class MechanismTable:
    """Loss and cost tables of one mechanism's configurations on one set of samples.

    Attributes
    ----------
    mechanism : str
        e.g. ``"cascade"``.
    parameter : str
        What ``values`` are, e.g. ``"threshold"`` or ``"budget (FLOPs)"``.
    values : float array (K,)
        The parameter of each row; row 0 is the full model.
    risks : tuple of str
        The risk of each slice of ``losses``.
    loss_bounds : tuple of float
        B of each risk.
    losses : float array (R, K, n)
        Loss of each sample under each configuration, against the full model (row 0 is 0).
    cost : float array (K, n)
        FLOPs of each sample under each configuration.
    ordered : bool
        True when each sample's exit can only move earlier along the rows (exit-rule and
        budget families); False for families that need fixed-sequence testing (skipping).
    exits : int array (K, n) or None
        The exit (or model) each sample takes, for the families that have one.
    """

    mechanism: str
    parameter: str
    values: Array
    risks: tuple[str, ...]
    loss_bounds: tuple[float, ...]
    losses: Array
    cost: Array
    ordered: bool
    exits: NDArray[np.int64] | None = None

    def __post_init__(self) -> None:
        r, k, n = self.losses.shape
        if len(self.risks) != r or len(self.loss_bounds) != r:
            raise ValueError(
                f"`risks` and `loss_bounds` must name the {r} risks of `losses`; got "
                f"{len(self.risks)} and {len(self.loss_bounds)}."
            )
        if self.values.shape != (k,) or self.cost.shape != (k, n):
            raise ValueError(
                f"`values` must have shape ({k},) and `cost` ({k}, {n}); got "
                f"{self.values.shape} and {self.cost.shape}."
            )
        if np.any(self.losses[:, 0] != 0.0):
            raise ValueError("row 0 of every loss table must be the full model (loss 0).")
        if self.exits is not None and self.exits.shape != (k, n):
            raise ValueError(f"`exits` must have shape ({k}, {n}); got {self.exits.shape}.")

    def __repr__(self) -> str:
        return (
            f"MechanismTable({self.mechanism!r}, rows={self.n_rows}, n={self.n}, "
            f"risks={list(self.risks)}, parameter={self.parameter!r})"
        )

    @property
    def n(self) -> int:
        return int(self.losses.shape[2])

    @property
    def n_rows(self) -> int:
        return int(self.losses.shape[1])

    @property
    def full_cost(self) -> float:
        """Mean FLOPs per sample of the full model (row 0)."""
        return float(self.cost[0].mean())

    def risk_index(self, risk: str) -> int:
        if risk not in self.risks:
            raise ValueError(
                f"`risk` must be one of {', '.join(map(repr, self.risks))} (the risks of this "
                f"table); got {risk!r}."
            )
        return self.risks.index(risk)

    def loss(self, risk: str) -> Array:
        """The loss table (K, n) of one risk."""
        return self.losses[self.risk_index(risk)]

    def subset(self, columns: ArrayLike) -> MechanismTable:
        """The same table on some samples (e.g. a calibration split)."""
        index = np.asarray(columns)
        return dataclasses.replace(
            self,
            losses=self.losses[:, :, index],
            cost=self.cost[:, index],
            exits=None if self.exits is None else self.exits[:, index],
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the table as an ``.npz`` (no pickle); ``load`` reads it back."""
        arrays: dict[str, Any] = {
            "mechanism": np.array(self.mechanism),
            "parameter": np.array(self.parameter),
            "values": self.values,
            "risks": np.array(",".join(self.risks)),
            "loss_bounds": np.array(self.loss_bounds),
            "losses": self.losses,
            "cost": self.cost,
            "ordered": np.array(self.ordered),
        }
        if self.exits is not None:
            arrays["exits"] = self.exits

        def write(name: str) -> None:
            with open(name, "wb") as handle:
                np.savez_compressed(handle, **arrays)

        return atomic_save(path, write, argument="path")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MechanismTable:
        """Read a table written by :meth:`save` (checked arrays only, never a pickle)."""
        data = read_npz(path, argument="path")
        return cls(
            mechanism=str(data["mechanism"]),
            parameter=str(data["parameter"]),
            values=np.asarray(data["values"], dtype=np.float64),
            risks=tuple(str(data["risks"]).split(",")),
            loss_bounds=tuple(float(b) for b in data["loss_bounds"]),
            losses=np.asarray(data["losses"], dtype=np.float64),
            cost=np.asarray(data["cost"], dtype=np.float64),
            ordered=bool(data["ordered"]),
            exits=np.asarray(data["exits"], dtype=np.int64) if "exits" in data else None,
        )


def _check_risks(risks: Sequence[str] | str) -> tuple[str, ...]:
    names = (risks,) if isinstance(risks, str) else tuple(risks)
    if not names:
        raise ValueError("`risks` must name at least one risk; got none.")
    return names


def _table(
    mechanism: str,
    parameter: str,
    values: Array,
    probs: Array,
    labels: ArrayLike | None,
    answers: NDArray[np.int64],
    *,
    risks: tuple[str, ...],
    rng: int | None,
    cost: Array,
    ordered: bool,
    exits: bool = True,
) -> MechanismTable:
    """The table of rows whose samples answer from column ``answers[k, i]`` of ``probs``.

    ``probs`` (n, L, C) has the full model last; ``answers`` (K, n) are kept as the table's
    ``exits`` unless ``exits=False`` (columns that are configurations, not exits).
    """
    losses, bound = [], []
    for name in risks:  # a few risks; each table is vectorised over rows and samples
        risk = get_risk(name, rng=rng)
        per_exit = per_exit_losses(probs, labels, risk)  # (n, L)
        losses.append(loss_table(per_exit, answers))  # (K, n)
        bound.append(float(risk.loss_bound))
    return MechanismTable(
        mechanism=mechanism,
        parameter=parameter,
        values=values,
        risks=risks,
        loss_bounds=tuple(bound),
        losses=np.stack(losses),
        cost=cost,
        ordered=ordered,
        exits=answers if exits else None,
    )


def exit_rule_table(
    mechanism: str,
    confidences: ArrayLike,
    probs: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    risks: Sequence[str] | str = RISKS,
    exit_cost: ArrayLike,
    full_cost: float,
    thresholds: ArrayLike | None = None,
    parameter: str = "threshold",
    rng: int | None = None,
) -> MechanismTable:
    """The table of a family that applies the exit rule to a confidence.

    Parameters
    ----------
    mechanism : str
    confidences : array (n, L)
        Confidence of each sample at each exit (a softmax measure, a cascade model's
        confidence, or the cumulative halting probability).
    probs : array (n, L, C)
        Every exit's class probabilities; the last exit is the full model.
    labels : int array (n,), optional
        Required for the gap risks.
    risks : str or sequence of str
    exit_cost : array (L,)
        FLOPs of a sample that stops at each exit (decisions on the way included).
    full_cost : float
        FLOPs of the never-exit row (no decision runs).
    thresholds : array (K,), optional
        Decreasing grid (``inf`` put first); default ``inf, 1.00, 0.99, ..., 0.00``.
    parameter : str
        Name of the parameter in reports (the thresholds are the values).
    rng : int, optional
        Seeds the pseudo-labels of ``distribution_consistency``.
    """
    names = _check_risks(risks)
    conf = as_float_array(confidences, "confidences", ndim=2)  # (n, L)
    p = as_float_array(probs, "probs", ndim=3)  # (n, L, C)
    if p.shape[:2] != conf.shape:
        raise ValueError(f"`probs` must have shape (n, L, C) = {conf.shape} + (C,); got {p.shape}.")
    grid = as_threshold_grid(thresholds)  # (K,)
    exits = exit_indices(conf, grid)  # (K, n)
    costs = as_float_array(exit_cost, "exit_cost", ndim=1)
    if costs.shape != (conf.shape[1],):
        raise ValueError(f"`exit_cost` must have shape ({conf.shape[1]},); got {costs.shape}.")
    cost = costs[exits]  # (K, n)
    cost[np.isposinf(grid)] = float(full_cost)  # the never-exit row runs no decision
    return _table(
        mechanism, parameter, grid, p, labels, exits, risks=names, rng=rng, cost=cost, ordered=True
    )


def budget_table(
    probs: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    risks: Sequence[str] | str = RISKS,
    budget_cost: ArrayLike,
    parameter: str = "budget (FLOPs)",
    rng: int | None = None,
) -> MechanismTable:
    """The table of anytime prediction at fixed budgets: row ``k`` answers from exit ``L-1-k``.

    ``budget_cost`` (L,) is the cost of answering from each exit alone (increasing); the
    rows' values are these budgets from the full model's down to the first exit's.
    """
    names = _check_risks(risks)
    p = as_float_array(probs, "probs", ndim=3)  # (n, L, C)
    n, n_exits, _ = p.shape
    budgets = as_float_array(budget_cost, "budget_cost", ndim=1)
    if budgets.shape != (n_exits,) or np.any(np.diff(budgets) <= 0):
        raise ValueError(
            f"`budget_cost` must hold {n_exits} increasing costs (one per exit); got "
            f"{budgets.tolist()}."
        )
    exit_of_row = np.arange(n_exits - 1, -1, -1)  # (K,) = L-1, ..., 0
    exits = np.broadcast_to(exit_of_row[:, None], (n_exits, n)).copy()  # (K, n)
    values = budgets[exit_of_row]  # (K,)
    return _table(
        "anytime",
        parameter,
        values,
        p,
        labels,
        exits,
        risks=names,
        rng=rng,
        cost=budgets[exits],
        ordered=True,
    )


def config_table(
    mechanism: str,
    probs: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    risks: Sequence[str] | str = RISKS,
    cost: ArrayLike,
    values: ArrayLike,
    parameter: str,
    ordered: bool = False,
    rng: int | None = None,
) -> MechanismTable:
    """The table of configurations run one by one (row 0 the full model).

    Parameters
    ----------
    probs : array (n, K, C)
        Class probabilities of every sample under every configuration; configuration 0 is
        the full model.
    cost : array (K, n)
    values : array (K,)
        The parameter of each configuration.
    ordered : bool, default False
        Whether the family is ordered (see :class:`MechanismTable`).
    """
    names = _check_risks(risks)
    p = as_float_array(probs, "probs", ndim=3)  # (n, K, C)
    n, n_rows, _ = p.shape
    costs = as_float_array(cost, "cost", ndim=2)
    grid = as_float_array(values, "values", ndim=1)
    if costs.shape != (n_rows, n) or grid.shape != (n_rows,):
        raise ValueError(
            f"`cost` must have shape ({n_rows}, {n}) and `values` ({n_rows},); got "
            f"{costs.shape} and {grid.shape}."
        )
    # The risk core compares every exit with the last one: put the full model last.
    reordered = np.concatenate([p[:, 1:], p[:, :1]], axis=1)  # (n, K, C)
    rows = np.concatenate([[n_rows - 1], np.arange(n_rows - 1)])  # row k -> column
    columns = np.broadcast_to(rows[:, None], (n_rows, n))  # (K, n)
    return _table(
        mechanism,
        parameter,
        grid,
        reordered,
        labels,
        columns,
        risks=names,
        rng=rng,
        cost=costs,
        ordered=ordered,
        exits=False,
    )


# ---------------------------------------------------------------------- certification


def check_procedure(table: MechanismTable, procedure: str | procedures.Procedure) -> str:
    """The canonical procedure name, refusing one whose guarantee the family cannot carry."""
    chosen = procedures.get_procedure(procedure)
    if not table.ordered and chosen.needs_monotone_risk:
        allowed = [
            p for p in procedures.PROCEDURES if not procedures.REGISTRY[p].needs_monotone_risk
        ]
        raise ValueError(
            f"`procedure` {chosen.name!r} assumes a risk monotone along the grid, which the "
            f"{table.mechanism} family does not have; use fixed-sequence testing (ucb-*, ltt) "
            f"or crc (monotonised losses): one of {', '.join(map(repr, allowed))}."
        )
    return chosen.name


@dataclasses.dataclass(frozen=True)
class MechanismPolicy:
    """A certified configuration of a mechanism: its parameter and the core's policy.

    Attributes
    ----------
    mechanism, parameter : str
    value : float
        The parameter of the selected configuration (the full model's when nothing was
        certified).
    policy : ExitPolicy
        The risk core's outcome on the table (index, guarantee, bounds, costs in FLOPs).
    """

    mechanism: str
    parameter: str
    value: float
    policy: ExitPolicy

    @property
    def certified(self) -> bool:
        return self.policy.certified

    @property
    def index(self) -> int:
        return self.policy.index

    @property
    def upper_bound(self) -> float | None:
        return self.policy.upper_bound

    @property
    def relative_saving(self) -> float | None:
        return self.policy.relative_saving

    def __repr__(self) -> str:
        saving = self.relative_saving
        return (
            f"MechanismPolicy({self.mechanism!r}, {self.parameter}={self.value:.4g}, "
            f"certified={self.certified}, procedure={self.policy.procedure!r}, "
            f"target_risk={self.policy.target_risk:g}, saving="
            f"{'-' if saving is None else f'{100 * saving:.1f}%'})"
        )

    def to_dict(self) -> dict[str, Any]:
        value: Any = "never" if math.isinf(self.value) else self.value
        return {
            "schema": "exitguard.MechanismPolicy",
            "mechanism": self.mechanism,
            "parameter": self.parameter,
            "value": value,
            "policy": self.policy.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MechanismPolicy:
        if data.get("schema") != "exitguard.MechanismPolicy":
            raise ValueError(f"not a mechanism policy: schema {data.get('schema')!r}.")
        value = math.inf if data["value"] == "never" else float(data["value"])
        return cls(
            mechanism=str(data["mechanism"]),
            parameter=str(data["parameter"]),
            value=value,
            policy=ExitPolicy.from_dict(data["policy"]),
        )


def certify(
    table: MechanismTable,
    *,
    risk: str,
    target_risk: float,
    delta: float = 0.1,
    procedure: str = "ucb-wsr",
    seed: int | None = None,
) -> MechanismPolicy:
    """The most aggressive configuration whose risk the procedure certifies.

    :func:`exitguard.calibrate_table` on ``table.loss(risk)`` with the FLOPs as cost; the
    guarantee is the procedure's (see there), for calibration and test data that are
    exchangeable. Families that are not ordered refuse procedures that assume a monotone risk.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> probs = rng.dirichlet(np.ones(3), size=(400, 3))  # (n, K, C): config 0 is the full model
    >>> probs[:, 1] = probs[:, 0]                          # config 1 changes nothing
    >>> table = config_table(
    ...     "layer skipping", probs, risks="prediction_consistency",
    ...     cost=np.tile([[3.0], [2.0], [1.0]], (1, 400)), values=[0.0, 0.5, 0.9],
    ...     parameter="gate threshold",
    ... )
    >>> policy = certify(table, risk="prediction_consistency", target_risk=0.1, procedure="ltt")
    >>> policy.value, policy.certified, round(policy.relative_saving, 3)
    (0.5, True, 0.333)
    """
    name = check_procedure(table, procedure)
    index = table.risk_index(risk)
    policy = calibrate_table(
        table.losses[index],
        target_risk=target_risk,
        delta=delta,
        procedure=name,
        loss_bound=table.loss_bounds[index],
        cost=table.cost,
        risk=risk,
        seed=seed,
    )
    return MechanismPolicy(
        mechanism=table.mechanism,
        parameter=table.parameter,
        value=float(table.values[policy.index]),
        policy=policy,
    )


def evaluate_table(
    table: MechanismTable,
    *,
    risk: str,
    procedures: Sequence[str] = ("crc", "ucb-wsr", "ltt"),
    target_risks: Sequence[float] = (0.01, 0.02, 0.05, 0.1),
    delta: float = 0.1,
    n_cal: int = 100,
    trials: int = 100,
    seed: int = 0,
    return_selections: bool = False,
) -> Evaluation:
    """Repeated random calibration/test splits of one risk's table (:func:`exitguard.evaluate`)."""
    names = tuple(check_procedure(table, p) for p in procedures)
    index = table.risk_index(risk)
    return evaluate(
        table.losses[index],
        procedures=names,
        target_risks=target_risks,
        delta=delta,
        n_cal=n_cal,
        trials=trials,
        loss_bound=table.loss_bounds[index],
        cost=table.cost,
        seed=seed,
        return_selections=return_selections,
    )


# ----------------------------------------------------------------- anytime risk curve


@dataclasses.dataclass(frozen=True)
class BudgetRiskCurve:
    """The risk of the answer available at each budget, with upper confidence bounds.

    Attributes
    ----------
    risk : str
    budget : tuple of float (L,)
        Cost of answering from each exit alone (increasing).
    empirical_risk : tuple of float (L,)
        Mean calibration loss of each exit against the full model (the last is 0).
    upper_bound : tuple of float (L,)
        Upper confidence bound of each budget's risk; simultaneously valid: with
        probability >= 1 - delta every budget's risk is below its bound (Bonferroni over the
        L - 1 early exits; the full model's risk is 0 by definition).
    delta : float
    bound : str
    n : int
    order_seed : int or None
        Seed of the reading order of the WSR bound.
    """

    risk: str
    budget: tuple[float, ...]
    empirical_risk: tuple[float, ...]
    upper_bound: tuple[float, ...]
    delta: float
    bound: str
    n: int
    order_seed: int | None

    def smallest_budget(self, target_risk: float) -> float:
        """The smallest budget whose bound is <= ``target_risk`` (the full model's if none)."""
        epsilon = check_open_unit(target_risk, "target_risk")
        fits = [b for b, u in zip(self.budget, self.upper_bound, strict=True) if u <= epsilon]
        return float(min(fits))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BudgetRiskCurve:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        for key in ("budget", "empirical_risk", "upper_bound"):
            values[key] = tuple(float(x) for x in values[key])
        return cls(**values)


def budget_risk_curve(
    probs: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    risk: str = "prediction_consistency",
    budget_cost: ArrayLike,
    delta: float = 0.1,
    bound: str = "wsr",
    seed: int | None = None,
    rng: int | None = None,
) -> BudgetRiskCurve:
    """The certified per-budget risk curve of anytime prediction.

    For each exit ``e`` the loss of answering from it against the full model, its mean, and an
    upper confidence bound at level ``delta / (L - 1)`` (so all hold together with
    probability >= 1 - delta over calibration sets of exchangeable data). The WSR bound reads
    the samples in a random permutation seeded by ``seed`` (fresh when None), as
    :func:`exitguard.calibrate_table` does.
    """
    level = check_open_unit(delta, "delta")
    p = as_float_array(probs, "probs", ndim=3)  # (n, L, C)
    n, n_exits, _ = p.shape
    budgets = as_float_array(budget_cost, "budget_cost", ndim=1)
    if budgets.shape != (n_exits,):
        raise ValueError(f"`budget_cost` must have shape ({n_exits},); got {budgets.shape}.")
    chosen = get_risk(risk, rng=rng)
    per_exit = per_exit_losses(p, labels, chosen)  # (n, L)
    relative = (per_exit - per_exit[:, -1:]).T  # (L, n)
    used_seed = None
    if bound == "wsr":
        used_seed = order_seed(seed)
        relative = relative[:, np.random.default_rng(used_seed).permutation(n)]
    upper = np.zeros(n_exits)
    if n_exits > 1:
        upper[:-1] = bounds.upper_bounds(
            relative[:-1], bound=bound, delta=level / (n_exits - 1), loss_bound=chosen.loss_bound
        )
    return BudgetRiskCurve(
        risk=chosen.name,
        budget=tuple(float(b) for b in budgets),
        empirical_risk=tuple(float(m) for m in relative.mean(axis=1)),
        upper_bound=tuple(float(u) for u in upper),
        delta=level,
        bound=bound,
        n=n,
        order_seed=used_seed,
    )
