"""Repeated random calibration/test splits: does the guarantee hold, and what does it save?"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from exitguard._files import atomic_write_text, load_json
from exitguard._memory import check_memory
from exitguard.calibration import ORDERS, as_procedure_list, check_table
from exitguard.policy import fingerprint
from exitguard.risk import procedures as proc
from exitguard.risk._validation import (
    check_choice,
    check_indices,
    check_int,
    check_open_unit,
    check_open_unit_list,
)

Array = NDArray[np.float64]

_CHUNK_ELEMENTS = 4_000_000  # calibration losses held at once: trials x K x n_cal


@dataclasses.dataclass(frozen=True)
class EvaluationRow:
    """Summary of one procedure at one target risk over all splits.

    ``test risk`` is the mean loss of the held-out split at the selected row; a *violation*
    is a split whose test risk exceeds the target. ``population risk`` treats the whole table
    as the population (the selected row's mean loss over all samples): its violation rate is
    free of the test split's own noise. ``violation_p_value`` is a one-sided binomial test of
    "violation rate <= delta" on the population violations (high-probability procedures).
    """

    procedure: str
    target_risk: float
    mean_test_risk: float
    sd_test_risk: float
    violation_rate: float
    mean_population_risk: float
    population_violation_rate: float
    violation_p_value: float | None
    mean_cost: float | None
    sd_cost: float | None
    relative_saving: float | None
    mean_index: float
    certified_rate: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Results of :func:`evaluate`: one :class:`EvaluationRow` per procedure and target risk."""

    rows: tuple[EvaluationRow, ...]
    delta: float
    n_cal: int
    n_test: int
    trials: int
    loss_bound: float
    full_cost: float | None
    seed: int | None
    data_fingerprint: str
    sample_order: str = "random"
    selections: dict[str, tuple[tuple[int, ...], ...]] | None = None
    order_seeds: tuple[int, ...] | None = None

    def __repr__(self) -> str:
        return (
            f"Evaluation({len(self.rows)} rows, n_cal={self.n_cal}, n_test={self.n_test}, "
            f"trials={self.trials}, delta={self.delta:g})"
        )

    def row(self, procedure: str, target_risk: float) -> EvaluationRow:
        """The row of one procedure at one target risk."""
        name = proc.canonical_procedure(procedure)
        for item in self.rows:
            if item.procedure == name and np.isclose(item.target_risk, target_risk):
                return item
        raise KeyError(f"no row for procedure={name!r}, target_risk={target_risk!r}.")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["rows"] = [r.to_dict() for r in self.rows]
        return {"schema": "exitguard.Evaluation", "schema_version": 1, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Evaluation:
        if data.get("schema") != "exitguard.Evaluation":
            raise ValueError(f"not an exitguard evaluation: schema {data.get('schema')!r}.")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        values["rows"] = tuple(EvaluationRow(**r) for r in data["rows"])
        if values.get("selections") is not None:
            values["selections"] = {
                name: tuple(tuple(int(i) for i in split) for split in rows)
                for name, rows in values["selections"].items()
            }
        if values.get("order_seeds") is not None:
            values["order_seeds"] = tuple(int(s) for s in values["order_seeds"])
        return cls(**values)

    def selected_rows(self, procedure: str) -> NDArray[np.int64]:
        """Row selected in every split at every target risk; shape (trials, E).

        Only available when :func:`evaluate` ran with ``return_selections=True``.
        """
        if self.selections is None:
            raise ValueError(
                "this evaluation holds no per-split selections; run evaluate(..., "
                "return_selections=True)."
            )
        name = proc.canonical_procedure(procedure)
        if name not in self.selections:
            raise KeyError(f"no selections for procedure={name!r}.")
        return np.asarray(self.selections[name], dtype=np.int64)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the results as JSON, atomically (see :mod:`exitguard._files`)."""
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        return atomic_write_text(path, text, argument="evaluation file")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Evaluation:
        """Read results written by :meth:`save` (strict JSON, at most 256 MiB)."""
        return cls.from_dict(
            load_json(path, max_bytes=256 << 20, max_depth=8, argument="evaluation file")
        )

    def table(self, *, cost_label: str = "cost") -> str:
        """A plain-text table of all rows.

        ``viol.``: share of splits whose test risk exceeds epsilon; ``pop.viol``: the same for
        the risk on the whole table; ``p(viol)``: one-sided binomial p-value of "pop.viol <=
        delta" (high-probability procedures; small values mean the guarantee looks broken);
        ``cert.``: share of splits in which an early-exit row was certified.
        """
        width = max(10, len(cost_label) + 2)
        header = (
            f"{'procedure':<15}{'eps':>6}{'test risk':>11}{'(sd)':>8}{'viol.':>7}"
            f"{'pop.viol':>9}{'p(viol)':>9}{cost_label:>{width}}{'saving':>8}{'cert.':>7}"
        )
        lines = [header, "-" * len(header)]
        for r in self.rows:
            cost = "-" if r.mean_cost is None else f"{r.mean_cost:.4g}"
            saving = "-" if r.relative_saving is None else f"{100 * r.relative_saving + 0.0:.1f}%"
            p_value = "-" if r.violation_p_value is None else f"{r.violation_p_value:.3g}"
            lines.append(
                f"{r.procedure:<15}{r.target_risk:>6.3f}{r.mean_test_risk:>11.4f}"
                f"{r.sd_test_risk:>8.4f}{r.violation_rate:>7.2f}{r.population_violation_rate:>9.2f}"
                f"{p_value:>9}{cost:>{width}}{saving:>8}{r.certified_rate:>7.2f}"
            )
        return "\n".join(lines)


def _evaluation_bytes(trials: int, n_rows: int, n_total: int, procedures: int, eps: int) -> float:
    """Peak memory of :func:`evaluate`: the split keys, per-trial rows, and one chunk."""
    per_trial = 8.0 * (n_total + 3 * n_rows + 2 * procedures * eps)  # keys, risks, costs, picks
    return trials * per_trial + 10 * 8.0 * _CHUNK_ELEMENTS


def split_indices(n: int, n_cal: int, trials: int, rng: np.random.Generator) -> NDArray[np.int64]:
    """Calibration indices of each trial, drawn without replacement; shape (trials, n_cal)."""
    keys = rng.random((trials, n))  # (T, N)
    return np.argpartition(keys, n_cal - 1, axis=1)[:, :n_cal]


def selections(
    cal_losses: Array,
    target_risks: Array,
    *,
    procedure: str | proc.Procedure,
    delta: float,
    loss_bound: float,
    bet_cap: float | None = None,
    order_seeds: ArrayLike | None = None,
) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
    """Selected rows for many calibration tables at once.

    ``cal_losses`` (T, K, n) -> selected row and certified flag, each (T, E). With
    ``order_seeds`` (T,), an order-dependent procedure reads table ``t`` in the order of
    :func:`exitguard.risk.procedures.reading_order` seeded by ``order_seeds[t]``, exactly as
    ``calibrate_table(cal_losses[t], seed=order_seeds[t])`` does; without it, in the order
    given.
    """
    chosen = proc.get_procedure(procedure)
    read = cal_losses
    if order_seeds is not None and chosen.order_dependent:
        seeds = np.asarray(order_seeds, dtype=np.int64).reshape(-1)
        generators = [np.random.default_rng(int(s)) for s in seeds]
        read = proc.in_order(cal_losses, proc.reading_order(cal_losses, generators))
    stats_ = chosen.statistic(
        read, target_risks, delta=delta, loss_bound=loss_bound, bet_cap=bet_cap
    )  # (T, E, K)
    ok = chosen.passes(stats_, target_risks, delta=delta, n_rows=cal_losses.shape[-2])
    return chosen.select(ok)


def check_splits(splits: ArrayLike, n_total: int) -> NDArray[np.int64]:
    """Validate user splits: calibration indices (T, n_cal), distinct within a split."""
    array = np.asarray(splits)
    if array.ndim != 2 or array.shape[0] < 1:
        raise ValueError(
            f"`splits` must be a 2-D array (trials, n_cal) of calibration indices; got shape "
            f"{array.shape}."
        )
    check_indices(array, "splits", size=n_total, of="sample")
    ordered = np.sort(array, axis=1)
    repeated = np.flatnonzero((np.diff(ordered, axis=1) == 0).any(axis=1))
    if repeated.size:
        raise ValueError(
            f"`splits` must not repeat a sample within a split; split {repeated[0]} does."
        )
    return array.astype(np.int64)


def evaluate(
    losses: ArrayLike,
    *,
    procedures: str | Sequence[str] = ("naive", "crc", "ucb-wsr", "ltt"),
    target_risks: float | Sequence[float] = (0.01, 0.02, 0.05, 0.1),
    delta: float = 0.1,
    n_cal: int = 100,
    trials: int = 100,
    loss_bound: float = 1.0,
    cost: ArrayLike | None = None,
    seed: int | np.random.Generator | None = 0,
    bet_cap: float | None = None,
    order: str = "random",
    splits: ArrayLike | None = None,
    return_selections: bool = False,
) -> Evaluation:
    """Calibrate on random subsets and measure risk and cost on the rest.

    Each trial draws ``n_cal`` calibration samples without replacement from the ``N``
    columns of ``losses`` (K, N); the remaining ``N - n_cal`` are the test split. Every
    procedure picks a row on the calibration split for every target risk, all vectorised.

    Parameters
    ----------
    losses : array of shape (K, N)
        The loss table (row 0 the full model, loss-free).
    procedures : str or sequence of str
        Procedure names (see :func:`exitguard.calibrate_table`).
    target_risks : float or sequence of floats in (0, 1)
    delta : float in (0, 1)
    n_cal : int
        Calibration size; at least 2 and at most ``N - 1``.
    trials : int
        Number of random splits.
    loss_bound : float
    cost : array of shape (K,) or (K, N), optional
        Compute per row; reported as the mean over the test split.
    seed : int or numpy Generator
        The only source of randomness: the splits, then one reading-order seed per split.
    bet_cap : float, optional
        WSR bet cap (default ``1 / loss_bound``).
    order : {"random", "given"}
        How order-dependent bounds read each calibration split (as in
        :func:`exitguard.calibrate_table`): in a random permutation seeded per split
        (``order_seeds``), or in the order of ``splits`` (the given order).
    splits : int array of shape (trials, n_cal), optional
        Your own calibration indices, one row per split (the test split is the rest);
        ``n_cal`` and ``trials`` then come from its shape.
    return_selections : bool
        Keep the row selected in every split (:meth:`Evaluation.selected_rows`) and the
        reading-order seed of every split, so single calibrations can be compared split by
        split: ``calibrate_table(losses[:, splits[t]], seed=order_seeds[t], ...)`` selects
        the same row as split ``t``.

    Returns
    -------
    Evaluation
    """
    names = as_procedure_list(procedures)
    chosen_procedures = [proc.get_procedure(name) for name in names]
    epsilons = check_open_unit_list(target_risks, "target_risks")
    level = check_open_unit(delta, "delta")
    check_choice(order, "order", ORDERS)
    table, cost_array, _ = check_table(losses, loss_bound=loss_bound, cost=cost)
    n_rows, n_total = table.shape
    seed_value = seed if isinstance(seed, int) else None
    rng = np.random.default_rng(seed)
    if splits is None:
        n_cal = check_int(n_cal, "n_cal", minimum=2)
        if n_cal >= n_total:
            raise ValueError(
                f"`n_cal` must be below the number of samples ({n_total}) to leave a test "
                f"split; got {n_cal}."
            )
        trials = check_int(trials, "trials", minimum=1)
        check_memory(
            _evaluation_bytes(trials, n_rows, n_total, len(names), len(epsilons)),
            what=f"evaluate with trials={trials} on a table of {n_rows} x {n_total}",
        )
        indices = split_indices(n_total, n_cal, trials, rng)  # (T, n)
    else:
        indices = check_splits(splits, n_total)
        trials, n_cal = indices.shape
        if n_cal < 2 or n_cal >= n_total:
            raise ValueError(
                f"`splits` must hold between 2 and {n_total - 1} calibration indices per split "
                f"to leave a test split; got {n_cal}."
            )
    # Drawn after the splits, so the splits of a seed are the same as without reading orders.
    order_seeds = rng.integers(0, 2**53, size=trials)  # (T,)
    n_test = n_total - n_cal
    total = table.sum(axis=1)  # (K,)
    population = table.mean(axis=1)  # (K,)
    if cost_array is not None and cost_array.ndim == 2:
        cost_total = cost_array.sum(axis=1)  # (K,)
    chosen = {name: np.zeros((trials, len(epsilons)), dtype=np.int64) for name in names}
    certified = {name: np.zeros((trials, len(epsilons)), dtype=bool) for name in names}
    test_risk = np.zeros((trials, n_rows))  # (T, K)
    test_cost = np.zeros((trials, n_rows)) if cost_array is not None else None
    chunk = max(1, _CHUNK_ELEMENTS // (n_rows * n_cal))
    # Loop over chunks of trials only to bound memory; each chunk is fully vectorised.
    for start in range(0, trials, chunk):
        part = indices[start : start + chunk]  # (t, n)
        cal = np.moveaxis(table[:, part], 0, 1)  # (t, K, n)
        test_risk[start : start + chunk] = (total[None] - cal.sum(axis=-1)) / n_test
        if test_cost is not None and cost_array is not None:
            if cost_array.ndim == 2:
                cal_cost = np.moveaxis(cost_array[:, part], 0, 1).sum(axis=-1)  # (t, K)
                test_cost[start : start + chunk] = (cost_total[None] - cal_cost) / n_test
            else:
                test_cost[start : start + chunk] = cost_array[None]
        # One pass per procedure over the chunk (few procedures; each is vectorised).
        for procedure in chosen_procedures:
            index, ok = selections(
                cal,
                epsilons,
                procedure=procedure,
                delta=level,
                loss_bound=loss_bound,
                bet_cap=bet_cap,
                order_seeds=order_seeds[start : start + chunk] if order == "random" else None,
            )
            chosen[procedure.name][start : start + chunk] = index
            certified[procedure.name][start : start + chunk] = ok
    full_cost = None
    if cost_array is not None:
        full_cost = float(cost_array[0].mean()) if cost_array.ndim == 2 else float(cost_array[0])
    trial_ids = np.arange(trials)[:, None]
    rows: list[EvaluationRow] = []
    for name in names:
        index = chosen[name]  # (T, E)
        risks = test_risk[trial_ids, index]  # (T, E)
        pop = population[index]  # (T, E)
        costs = test_cost[trial_ids, index] if test_cost is not None else None
        for e, epsilon in enumerate(epsilons):
            violations = int(np.sum(pop[:, e] > epsilon))
            p_value = None
            if proc.is_high_probability(name):
                from scipy import stats  # imported on use: `import exitguard` stays light

                p_value = float(
                    stats.binomtest(violations, trials, level, alternative="greater").pvalue
                )
            mean_cost = sd_cost = saving = None
            if costs is not None:
                mean_cost = float(costs[:, e].mean())
                sd_cost = float(costs[:, e].std(ddof=1)) if trials > 1 else 0.0
                saving = 1.0 - mean_cost / full_cost if full_cost else None
            rows.append(
                EvaluationRow(
                    procedure=name,
                    target_risk=float(epsilon),
                    mean_test_risk=float(risks[:, e].mean()),
                    sd_test_risk=float(risks[:, e].std(ddof=1)) if trials > 1 else 0.0,
                    violation_rate=float(np.mean(risks[:, e] > epsilon)),
                    mean_population_risk=float(pop[:, e].mean()),
                    population_violation_rate=violations / trials,
                    violation_p_value=p_value,
                    mean_cost=mean_cost,
                    sd_cost=sd_cost,
                    relative_saving=saving,
                    mean_index=float(index[:, e].mean()),
                    certified_rate=float(certified[name][:, e].mean()),
                )
            )
    kept = None
    if return_selections:
        kept = {
            name: tuple(tuple(int(i) for i in split) for split in chosen[name]) for name in names
        }
    return Evaluation(
        rows=tuple(rows),
        delta=level,
        n_cal=n_cal,
        n_test=n_test,
        trials=trials,
        loss_bound=float(loss_bound),
        full_cost=full_cost,
        seed=seed_value,
        data_fingerprint=fingerprint(table),
        sample_order=order,
        selections=kept,
        order_seeds=tuple(int(s) for s in order_seeds) if return_selections else None,
    )
