"""The single certified threshold against Pareto Testing, side by side over repeated splits.

:func:`compare_methods` draws ``trials`` calibration sets of size ``n_cal`` from a task's
held-out per-exit outputs (:class:`PerExitOutputs`); on each it certifies a policy with every
method of ``methods`` (the same calibration set and seed for all), then measures the policy on
the rest of the held-out data: compute saved against the full model, mean exit, test risk,
whether the test risk exceeds epsilon, and whether the policy's risk on *all* held-out data
(the population) exceeds epsilon; the population violation rate is judged by a one-sided
binomial test of "rate <= delta". Every Pareto row also gets its compute reduction against the
first single-threshold method, paired split by split.

Methods (:class:`Method`):

* ``single``: one threshold shared by every exit, tested along the grid in its natural order
  for every risk at once (for one risk exactly :func:`exitguard.calibrate_table`);
* ``pareto``: a threshold vector by Pareto Testing with a split of the calibration set;
* ``pareto-external``: the order learnt on ``n_cal`` further held-out samples (unlabeled
  data suffice for consistency risks), all ``n_cal`` calibration samples testing; those
  samples are left out of that method's test split. Not at equal data.

A risk is a name of ``outputs.per_exit``, or ``NAME>T`` for its tail risk ``P(loss > T)``.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from scipy import stats

from exitguard.evaluation import split_indices
from exitguard.risk.configurations import evaluate_vectors
from exitguard.risk.exits import exit_indices
from exitguard.risk.losses import loss_table
from exitguard.risk.pareto import VectorSearch, pareto_test, pareto_test_table
from exitguard.risk.tail import exceedance_per_exit

Array = NDArray[np.float64]


@dataclasses.dataclass(frozen=True, repr=False)
class PerExitOutputs:
    """Per-exit outputs of a task's held-out data: everything the comparison needs.

    Attributes
    ----------
    name : str
    confidences : array (N, L)
    per_exit : mapping of str to array (N, L)
        Absolute per-exit losses of each risk, in [0, loss_bounds[risk]].
    loss_bounds : mapping of str to float
    exit_cost : array (L,)
        Cost of leaving at each exit with every head on the way run (e.g. FLOPs).
    head_cost : array (L,)
        Cost of each exit head (a disabled exit's head does not run).
    full_cost : float
        Cost of the never-exit pass: the backbone and the last head only.
    grid : array (K,)
        The scalar threshold grid of the single-threshold methods.
    label_free : tuple of str
        The risks that need no labels (an external optimisation set may be unlabeled).
    """

    name: str
    confidences: Array
    per_exit: Mapping[str, Array]
    loss_bounds: Mapping[str, float]
    exit_cost: Array
    head_cost: Array
    full_cost: float
    grid: Array
    label_free: tuple[str, ...] = ("prediction_consistency", "distribution_consistency")

    def __repr__(self) -> str:
        n, n_exits = self.confidences.shape
        return f"PerExitOutputs({self.name!r}, N={n}, exits={n_exits}, risks={list(self.per_exit)})"

    def risk_table(self, risk: str) -> tuple[Array, float]:
        """Per-exit losses (N, L) and bound of ``NAME`` or of the tail risk ``NAME>T``."""
        name, _, tolerance = risk.partition(">")
        if not tolerance:
            return self.per_exit[name], float(self.loss_bounds[name])
        return exceedance_per_exit(self.per_exit[name], float(tolerance)), 1.0


@dataclasses.dataclass(frozen=True)
class Method:
    """One way of certifying a policy (see the module notes)."""

    name: str
    kind: Literal["single", "pareto", "pareto-external"]
    procedure: str = "ucb-wsr"
    opt_fraction: float = 0.5


DEFAULT_METHODS = (
    Method("single UCB-WSR", "single", "ucb-wsr"),
    Method("single LTT-HB", "single", "ltt"),
    Method("pareto WSR", "pareto", "ucb-wsr", 0.5),
    Method("pareto WSR 1/4", "pareto", "ucb-wsr", 0.25),
    Method("pareto WSR +ext", "pareto-external", "ucb-wsr"),
)
"""The benchmark's methods: the paper's half split, a quarter split, an external set."""


@dataclasses.dataclass
class _Outcome:
    """Per split, for one method: exits (N,), losses (R, N), cost (N,), certified, unused."""

    exits: list[NDArray[np.int64]] = dataclasses.field(default_factory=list)
    losses: list[Array] = dataclasses.field(default_factory=list)
    cost: list[Array] = dataclasses.field(default_factory=list)
    certified: list[bool] = dataclasses.field(default_factory=list)
    unused: list[NDArray[np.int64]] = dataclasses.field(default_factory=list)

    def add(self, exits, losses, cost, certified, unused=None) -> None:  # type: ignore[no-untyped-def]
        self.exits.append(exits)
        self.losses.append(losses)
        self.cost.append(cost)
        self.certified.append(bool(certified))
        self.unused.append(np.zeros(0, dtype=np.int64) if unused is None else unused)


def compare_methods(
    outputs: PerExitOutputs,
    risks: Sequence[str],
    target_risks: Sequence[float],
    *,
    n_cal: int,
    trials: int = 100,
    delta: float = 0.1,
    seed: int = 0,
    methods: Sequence[Method] = DEFAULT_METHODS,
    search: VectorSearch | None = None,
) -> list[dict[str, Any]]:
    """Every method on the same ``trials`` random calibration sets; one summary row each.

    Returns
    -------
    list of dict
        Per method: ``method``, ``flops_saving`` (mean over test splits, against
        ``full_cost``), ``mean_exit`` (0-based), ``mean_test_risk`` (per risk),
        ``violation_rate`` (test split), ``population_violation_rate`` and its binomial
        ``violation_p_value``, ``certified_rate``; Pareto rows add
        ``flops_reduction_vs_single`` and its paired standard error ``flops_reduction_se``.
        External-set methods are skipped when a risk needs labels or when the calibration
        and external sets (2 n_cal) would leave no test sample.
    """
    n_total = outputs.confidences.shape[0]
    rng = np.random.default_rng(seed)
    splits = split_indices(n_total, n_cal, trials, rng)  # (T, n)
    seeds = rng.integers(0, 2**53, size=trials)
    eps = np.asarray(target_risks, dtype=np.float64)
    tables = [outputs.risk_table(r) for r in risks]
    per_exit = np.stack([t for t, _ in tables])  # (R, N, L)
    bounds = [b for _, b in tables]
    exits = exit_indices(outputs.confidences, outputs.grid)  # (K, N)
    losses = np.stack([loss_table(t, exits) for t in per_exit])  # (R, K, N)
    cost = outputs.exit_cost[exits]  # (K, N) every head on the way runs
    cost[0] = outputs.full_cost  # the never-exit row runs no intermediate head
    label_free = all(r.partition(">")[0] in outputs.label_free for r in risks)
    chosen = [
        m for m in methods if m.kind != "pareto-external" or (label_free and 2 * n_cal < n_total)
    ]
    outcomes = {m.name: _Outcome() for m in chosen}
    started = time.perf_counter()
    for t, cal in enumerate(splits):  # one calibration set per split
        run_seed = int(seeds[t])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nothing certified, certified above the target
            for method in chosen:  # the few methods
                if method.kind == "single":
                    selection = pareto_test_table(
                        losses[:, :, cal],
                        target_risks=eps,
                        cost=cost[:, cal],
                        delta=delta,
                        loss_bounds=bounds,
                        procedure=method.procedure,
                        order="natural",
                        seed=run_seed,
                    )
                    row = int(selection.row)  # type: ignore[arg-type]
                    outcomes[method.name].add(
                        exits[row], losses[:, row], cost[row], selection.certified
                    )
                    continue
                extra: dict[str, Any] = {}
                unused = None
                if method.kind == "pareto-external":
                    rest = np.setdiff1d(np.arange(n_total), cal)
                    unused = np.random.default_rng(run_seed).choice(rest, n_cal, replace=False)
                    extra = {
                        "opt_confidences": outputs.confidences[unused],
                        "opt_per_exit_losses": per_exit[:, unused],
                    }
                else:
                    extra = {"opt_fraction": method.opt_fraction}
                selection = pareto_test(
                    outputs.confidences[cal],
                    per_exit[:, cal],
                    target_risks=eps,
                    delta=delta,
                    loss_bounds=bounds,
                    exit_cost=outputs.exit_cost,
                    head_cost=outputs.head_cost,
                    procedure=method.procedure,
                    search=search,
                    seed=run_seed,
                    **extra,
                )
                table = evaluate_vectors(
                    outputs.confidences,
                    per_exit,
                    np.array([selection.thresholds]),
                    loss_bounds=bounds,
                    exit_cost=outputs.exit_cost,
                    head_cost=outputs.head_cost,
                )
                outcomes[method.name].add(
                    table.exits[0], table.losses[:, 0], table.cost[0], selection.certified, unused
                )
    elapsed = time.perf_counter() - started
    rows = _summarise(outputs, list(risks), eps, splits, outcomes, delta, chosen)
    for row in rows:
        row["n_cal"] = n_cal
    rows[0]["seconds_all_methods"] = elapsed
    return rows


def compare_on_table(
    losses: Array,
    cost: Array,
    *,
    name: str,
    risks: Sequence[str],
    target_risks: Sequence[float],
    loss_bounds: Sequence[float],
    n_cal: int,
    trials: int = 100,
    delta: float = 0.1,
    seed: int = 0,
    methods: Sequence[Method] = (
        Method("single UCB-WSR", "single", "ucb-wsr"),
        Method("pareto WSR 1/4", "pareto", "ucb-wsr", 0.25),
    ),
) -> list[dict[str, Any]]:
    """:func:`compare_methods` on a precomputed table (R, K, N) with cost (K,) or (K, N).

    For tasks whose table comes from a sweep (one generation per configuration): ``single``
    tests the rows in their given order, ``pareto`` learns the order of the rows on a share
    of the calibration set (:func:`exitguard.risk.pareto.pareto_test_table`). Row 0 is the
    full model.
    """
    table = np.asarray(losses, dtype=np.float64)  # (R, K, N)
    n_total = table.shape[2]
    per_sample = np.asarray(cost, dtype=np.float64)
    if per_sample.ndim == 1:
        per_sample = np.repeat(per_sample[:, None], n_total, axis=1)  # (K, N)
    rng = np.random.default_rng(seed)
    splits = split_indices(n_total, n_cal, trials, rng)  # (T, n)
    seeds = rng.integers(0, 2**53, size=trials)
    eps = np.asarray(target_risks, dtype=np.float64)
    outcomes = {m.name: _Outcome() for m in methods}
    started = time.perf_counter()
    for t, cal in enumerate(splits):  # one calibration set per split
        for method in methods:  # the few methods
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # nothing certified
                selection = pareto_test_table(
                    table[:, :, cal],
                    target_risks=eps,
                    cost=per_sample[:, cal],
                    delta=delta,
                    loss_bounds=loss_bounds,
                    procedure=method.procedure,
                    order="natural" if method.kind == "single" else "pareto",
                    opt_fraction=method.opt_fraction,
                    seed=int(seeds[t]),
                )
            row = int(selection.row)  # type: ignore[arg-type]
            outcomes[method.name].add(None, table[:, row], per_sample[row], selection.certified)
    elapsed = time.perf_counter() - started
    outputs = PerExitOutputs(
        name=name,
        confidences=np.zeros((n_total, 1)),
        per_exit={},
        loss_bounds={},
        exit_cost=np.zeros(1),
        head_cost=np.zeros(1),
        full_cost=float(per_sample[0].mean()),
        grid=np.array([math.inf]),
    )
    rows = _summarise(outputs, list(risks), eps, splits, outcomes, delta, methods)
    for row in rows:
        row["n_cal"] = n_cal
    rows[0]["seconds_all_methods"] = elapsed
    return rows


def _summarise(
    outputs: PerExitOutputs,
    risks: list[str],
    eps: Array,
    splits: NDArray[np.int64],
    outcomes: Mapping[str, _Outcome],
    delta: float,
    methods: Sequence[Method],
) -> list[dict[str, Any]]:
    n_total = outputs.confidences.shape[0]
    rows = []
    reference = None
    for method in methods:  # the few methods
        outcome = outcomes[method.name]
        test_cost, test_exit, test_risk, population = [], [], [], []
        for t, cal in enumerate(splits):  # per split: the held-out rest is the test split
            held = np.ones(n_total, dtype=bool)
            held[cal] = False
            held[outcome.unused[t]] = False
            test_cost.append(outcome.cost[t][held].mean())
            if outcome.exits[t] is not None:
                test_exit.append(outcome.exits[t][held].mean())
            test_risk.append(outcome.losses[t][:, held].mean(axis=1))
            population.append(outcome.losses[t].mean(axis=1))
        costs = np.array(test_cost)  # (T,)
        risk_values = np.array(test_risk)  # (T, R)
        violations = int(np.sum(np.any(np.array(population) > eps, axis=1)))
        p_value = stats.binomtest(violations, len(splits), delta, alternative="greater").pvalue
        row: dict[str, Any] = {
            "task": outputs.name,
            "risks": risks,
            "target_risks": eps.tolist(),
            "method": method.name,
            "kind": method.kind,
            "procedure": method.procedure,
            "opt_fraction": method.opt_fraction if method.kind == "pareto" else None,
            "flops_saving": float(1.0 - costs.mean() / outputs.full_cost),
            "mean_exit": float(np.mean(test_exit)) if test_exit else None,
            "mean_test_risk": risk_values.mean(axis=0).tolist(),
            "violation_rate": float(np.mean(np.any(risk_values > eps, axis=1))),
            "population_violation_rate": violations / len(splits),
            "violation_p_value": float(p_value),
            "certified_rate": float(np.mean(outcome.certified)),
        }
        if reference is None and method.kind == "single":
            reference = costs
        elif reference is not None and method.kind != "single":
            paired = 1.0 - costs / reference  # split by split
            row["flops_reduction_vs_single"] = float(1.0 - costs.mean() / reference.mean())
            row["flops_reduction_se"] = float(paired.std(ddof=1) / math.sqrt(len(paired)))
        rows.append(row)
    return rows


def comparison_table(rows: Sequence[Mapping[str, Any]], *, title: str) -> dict[str, Any]:
    """A report table (``title``, ``header``, ``rows``, ``note``) of :func:`compare_methods`."""
    body = []
    for row in rows:
        reduction = row.get("flops_reduction_vs_single")
        body.append(
            [
                row["method"],
                ", ".join(
                    f"{r} ≤ {e:g}" for r, e in zip(row["risks"], row["target_risks"], strict=True)
                ),
                row["n_cal"],
                f"{100 * row['flops_saving']:.1f}%",
                row["mean_exit"],  # None for a table without exits
                ", ".join(f"{v:.4f}" for v in row["mean_test_risk"]),
                row["population_violation_rate"],
                row["violation_p_value"],
                None if reduction is None else f"{100 * reduction:+.1f}%",
            ]
        )
    return {
        "title": title,
        "header": [
            "method",
            "promise",
            "n",
            "FLOPs saved",
            "mean exit",
            "test risk",
            "pop. viol.",
            "binomial p",
            "FLOPs vs single",
        ],
        "rows": body,
        "note": (
            "single: one certified threshold for every exit; pareto: one threshold per exit, "
            "certified by Pareto Testing (the order learnt on a share of the calibration set, "
            "tested on the rest); +ext: the order learnt on as many further unlabeled samples. "
            "Same splits, epsilon, delta and n for every row; FLOPs vs single is paired split "
            "by split against the first single-threshold row."
        ),
    }


def side_by_side(
    outputs: PerExitOutputs,
    risk: str,
    target_risk: float,
    *,
    n_cal: int,
    trials: int,
    delta: float,
    seed: int,
    quick: bool = False,
) -> tuple[dict[str, Any], str]:
    """The demo's comparison: the single threshold beside per-exit thresholds, one risk.

    Returns a report table and one summary sentence saying whether the per-exit policy
    helps (more compute saved at the same epsilon, delta and n) or not. ``quick`` uses a
    smaller search.
    """
    methods = (
        Method("single UCB-WSR", "single", "ucb-wsr"),
        Method("pareto WSR 1/4", "pareto", "ucb-wsr", 0.25),
        Method("pareto WSR +ext", "pareto-external", "ucb-wsr"),
    )
    search = (
        VectorSearch(levels=16, restarts=0, multipliers=6)
        if quick
        else VectorSearch(restarts=1, multipliers=12)
    )
    rows = compare_methods(
        outputs,
        [risk],
        [target_risk],
        n_cal=n_cal,
        trials=trials,
        delta=delta,
        seed=seed,
        methods=methods,
        search=search,
    )
    single, pareto = rows[0], rows[1]
    gain = pareto["flops_reduction_vs_single"]
    verdict = (
        f"Per-exit thresholds (Pareto Testing, a quarter of the {n_cal} samples learning the "
        f"order) save {100 * pareto['flops_saving']:.1f}% of FLOPs against "
        f"{100 * single['flops_saving']:.1f}% for the single threshold at the same ε = "
        f"{target_risk:g}, δ = {delta:g}, n = {n_cal} ("
        + (
            f"{100 * gain:.1f}% fewer FLOPs than the single threshold"
            if gain > 0
            else f"{-100 * gain:.1f}% more FLOPs than the single threshold"
        )
        + f", {trials} splits)"
    )
    verdict += "." if gain > 0 else "; here the single threshold is as good or better."
    table = comparison_table(
        rows, title="Single threshold against per-exit thresholds (Pareto Testing)"
    )
    return table, verdict
