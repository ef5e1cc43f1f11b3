"""compare_methods: the single threshold and Pareto Testing on the same splits."""

from __future__ import annotations

import numpy as np
import pytest

from exitguard.calibration import calibrate_table
from exitguard.evaluation import split_indices
from exitguard.pareto_evaluation import (
    Method,
    PerExitOutputs,
    compare_methods,
    comparison_table,
    side_by_side,
)
from exitguard.risk.confidence import confidences
from exitguard.risk.exits import default_thresholds, exit_indices
from exitguard.risk.losses import get_risk, loss_table, per_exit_losses
from exitguard.risk.pareto import VectorSearch
from exitguard.risk.tail import exceedance_per_exit
from tests.test_pareto_calibration import outputs as make_outputs

SEARCH = VectorSearch(levels=12, restarts=0, multipliers=6, scalar_levels=40)


@pytest.fixture(scope="module")
def task() -> PerExitOutputs:
    probs, labels = make_outputs(1500, 11)
    risks = ("prediction_consistency", "distribution_consistency", "prediction_gap")
    return PerExitOutputs(
        name="synthetic",
        confidences=confidences(probs, measure="max_softmax"),
        per_exit={r: per_exit_losses(probs, labels, get_risk(r, rng=0)) for r in risks},
        loss_bounds={r: get_risk(r).loss_bound for r in risks},
        exit_cost=np.array([1.0, 2.0, 3.0, 4.0]),
        head_cost=np.array([0.2, 0.2, 0.2, 0.2]),
        full_cost=3.4,
        grid=default_thresholds(0.02),
    )


def test_the_single_threshold_row_is_calibrate_table_split_by_split(task):
    trials, n_cal = 6, 300
    rows = compare_methods(
        task,
        ["prediction_consistency"],
        [0.05],
        n_cal=n_cal,
        trials=trials,
        seed=4,
        methods=[Method("single UCB-WSR", "single", "ucb-wsr")],
    )
    # The same splits and seeds, written out with the single-risk API.
    rng = np.random.default_rng(4)
    splits = split_indices(1500, n_cal, trials, rng)
    seeds = rng.integers(0, 2**53, size=trials)
    exits = exit_indices(task.confidences, task.grid)
    losses = loss_table(task.per_exit["prediction_consistency"], exits)
    costs, taken = [], []
    for cal, seed in zip(splits, seeds, strict=True):
        policy = calibrate_table(
            losses[:, cal], target_risk=0.05, thresholds=task.grid, seed=int(seed)
        )
        held = np.setdiff1d(np.arange(1500), cal)
        cost = task.exit_cost[exits[policy.index]]
        costs.append(task.full_cost if policy.index == 0 else cost[held].mean())
        taken.append(exits[policy.index][held].mean())  # 0-based exits
    assert rows[0]["flops_saving"] == pytest.approx(1 - np.mean(costs) / task.full_cost)
    assert rows[0]["mean_exit"] == pytest.approx(np.mean(taken))


def test_rows_cover_every_method_with_paired_reductions(task):
    rows = compare_methods(
        task,
        ["prediction_consistency", "distribution_consistency>0.5"],
        [0.05, 0.05],
        n_cal=400,
        trials=4,
        seed=1,
        search=SEARCH,
    )
    assert [r["method"] for r in rows] == [
        "single UCB-WSR",
        "single LTT-HB",
        "pareto WSR",
        "pareto WSR 1/4",
        "pareto WSR +ext",
    ]
    assert "flops_reduction_vs_single" not in rows[1]
    assert all("flops_reduction_vs_single" in r for r in rows[2:])
    assert all(0.0 <= r["population_violation_rate"] <= 1.0 for r in rows)
    assert rows[0]["n_cal"] == 400 and len(rows[0]["mean_test_risk"]) == 2
    # The tail risk is the exceedance of the Brier loss, as a 0-1 loss.
    table, _ = task.risk_table("distribution_consistency>0.5")
    expected = exceedance_per_exit(task.per_exit["distribution_consistency"], 0.5)
    np.testing.assert_array_equal(table, expected)
    # A label-needing risk leaves the external (unlabeled) set out.
    gap = compare_methods(
        task, ["prediction_gap"], [0.05], n_cal=300, trials=2, seed=1, search=SEARCH
    )
    assert "pareto WSR +ext" not in [r["method"] for r in gap]
    report = comparison_table(rows, title="t")
    assert len(report["rows"]) == 5 and len(report["header"]) == len(report["rows"][0])


def test_side_by_side_says_whether_vectors_help(task):
    table, verdict = side_by_side(
        task, "prediction_consistency", 0.05, n_cal=400, trials=3, delta=0.1, seed=0, quick=True
    )
    assert table["rows"][0][0] == "single UCB-WSR"
    assert "Per-exit thresholds" in verdict and "ε = 0.05" in verdict
