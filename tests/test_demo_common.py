"""The plumbing the demos share (tasks/common.py): one evaluation per risk, from which the mean
exit is read off the same selections."""

import numpy as np
import pytest

pytest.importorskip("torch")

from exitguard import evaluate
from exitguard.tasks.common import calibration_split, evaluate_risk

PROCEDURES = ("naive", "crc", "ucb-wsr", "ltt")
TARGETS = (0.02, 0.05, 0.1, 0.2)


def toy_table(seed=1, k=30, n=500):
    rng = np.random.default_rng(seed)
    losses = (rng.random((k, n)) < np.linspace(0, 0.4, k)[:, None]).astype(float)
    exits = np.minimum(np.arange(k)[::-1, None] // 6 + rng.integers(0, 2, (k, n)), 4)
    exits[0] = 4  # row 0: the full model
    return losses, exits, (exits + 1.0) * 10.0


def test_the_mean_exit_is_that_of_the_selected_policies():
    """Oracle: a second evaluation with the exits as the cost, on the same splits."""
    losses, exits, cost = toy_table()
    result = evaluate_risk(
        losses,
        cost=cost,
        exits=exits,
        loss_bound=1.0,
        title="toy",
        procedures=PROCEDURES,
        target_risks=TARGETS,
        delta=0.1,
        n_cal=150,
        trials=40,
        seed=3,
    )
    # The public call with the same n_cal, trials and seed: the same splits and reading orders.
    common = dict(
        procedures=PROCEDURES, target_risks=TARGETS, delta=0.1, n_cal=150, trials=40, seed=3
    )
    by_exit = evaluate(losses, cost=exits.astype(float), **common)
    by_flops = evaluate(losses, cost=cost, **common)
    assert result.evaluation.rows == by_flops.rows
    assert result.evaluation_exits.full_cost == 4.0
    for ours, direct in zip(result.evaluation_exits.rows, by_exit.rows, strict=True):
        assert (ours.procedure, ours.target_risk) == (direct.procedure, direct.target_risk)
        assert ours.mean_cost == pytest.approx(direct.mean_cost, rel=1e-12)
        assert ours.sd_cost == pytest.approx(direct.sd_cost, rel=1e-9)
        assert ours.relative_saving == pytest.approx(direct.relative_saving, rel=1e-12)
        assert ours.mean_test_risk == direct.mean_test_risk  # the same selections
    assert result.evaluation.selections is None  # the page keeps the summaries only


def test_the_timed_split_is_seeded_and_disjoint():
    cal, test = calibration_split(50, 20, seed=4)
    again, _ = calibration_split(50, 20, seed=4)
    np.testing.assert_array_equal(cal, again)
    assert len(cal) == 20 and len(test) == 30
    assert sorted([*cal, *test]) == list(range(50))
    other, _ = calibration_split(50, 20, seed=5)
    assert not np.array_equal(cal, other)
