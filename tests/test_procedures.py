"""Procedures on tiny tables worked out by hand, and their invariants."""

import math
import warnings

import numpy as np
import pytest

from exitguard import RiskNotControlledWarning, calibrate_table
from exitguard.evaluation import selections
from exitguard.risk.procedures import PROCEDURES, canonical_procedure, passes

# Four rows, four samples, B = 1. Row means: 0, 0.25, 0.5, 0.75.
TABLE = np.array(
    [
        [0, 0, 0, 0],
        [0, 0, 0, 1],
        [0, 1, 0, 1],
        [1, 1, 0, 1],
    ],
    dtype=float,
)


def pick(losses, procedure, eps, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return calibrate_table(losses, target_risk=eps, procedure=procedure, **kwargs)


@pytest.mark.parametrize(("eps", "row"), [(0.2, 0), (0.3, 1), (0.5, 2), (0.8, 3)])
def test_naive_by_hand(eps, row):
    # Eq. 9 with <=: eps = 0.5 admits row 2 (mean exactly 0.5).
    policy = pick(TABLE, "naive", eps)
    assert policy.index == row
    assert policy.certified is False  # naive carries no guarantee


@pytest.mark.parametrize(
    ("eps", "row", "certified"), [(0.3, 0, False), (0.5, 1, True), (0.6, 2, True), (0.8, 3, True)]
)
def test_crc_by_hand(eps, row, certified):
    # n = 4: adjusted risks (4 mean + 1) / 5 = 0.4, 0.6, 0.8 for rows 1..3; at 0.8 every row
    # passes and the most aggressive one is taken.
    policy = pick(TABLE, "crc", eps)
    assert (policy.index, policy.certified) == (row, certified)
    if certified:
        assert policy.upper_bound == pytest.approx((4 * TABLE[row].mean() + 1) / 5)


def test_naive_and_crc_take_the_last_passing_row_ucb_stops_at_the_first_failure():
    n = 200
    width = 2 * math.sqrt(math.log(10) / (2 * n))  # Hoeffding on [-1, 1]
    means = [0.0, -0.1, 0.0, -0.2]  # row 2 fails at eps = 0.1, row 3 passes again
    table = np.repeat(np.array(means)[:, None], n, axis=1)
    ucb = pick(table, "ucb-hoeffding", 0.1)
    assert ucb.index == 1
    assert ucb.upper_bound == pytest.approx(-0.1 + width)
    assert pick(table, "crc", 0.1).index == 3
    assert pick(table, "naive", 0.05).index == 3


def test_ltt_fixed_sequence_returns_the_last_rejected_row():
    n = 100
    rows = [np.zeros(n), np.zeros(n), (np.arange(n) < 20).astype(float), np.zeros(n)]
    table = np.array(rows)
    # p-values at eps = 0.1: rows 1 and 3 about 0.9^100 (rejected), row 2 about 1 (kept).
    policy = pick(table, "ltt", 0.1)
    assert policy.index == 1  # the official code returns row 2, one row too far
    assert policy.p_value == pytest.approx(0.9**100)
    assert pick(table, "ltt-bonferroni", 0.1).index == 3  # every rejection is valid


def test_ucb_is_strict_and_ltt_is_not():
    # UCB < eps (Eq. 12) is p-value < delta; an LTT rejection is p-value <= delta.
    p = np.array([[0.1, 0.1, 0.05]])  # (E, K) with one target risk
    eps = np.array([0.05])
    np.testing.assert_array_equal(
        passes(p, eps, procedure="ucb-wsr", delta=0.1, n_rows=3), [[False, False, True]]
    )
    np.testing.assert_array_equal(
        passes(p, eps, procedure="ltt", delta=0.1, n_rows=3), [[True, True, True]]
    )
    adjusted = np.array([[0.05, 0.05, 0.06]])
    np.testing.assert_array_equal(
        passes(adjusted, eps, procedure="crc", delta=0.1, n_rows=3), [[True, True, False]]
    )


def test_nothing_certified_gives_the_full_model_and_warns():
    table = np.zeros((3, 100))
    table[1:, :10] = 1.0
    with pytest.warns(RiskNotControlledWarning, match="no early-exit policy could be certified"):
        policy = calibrate_table(
            table, target_risk=0.01, procedure="ucb-wsr", thresholds=[np.inf, 0.5, 0.1]
        )
    assert (policy.index, policy.certified, policy.is_full_model) == (0, False, True)
    assert math.isinf(policy.threshold)


def test_ucb_binomial_needs_binary_losses():
    with pytest.raises(ValueError, match="'ucb-binomial' needs 0-1 losses"):
        calibrate_table(
            np.full((2, 10), 0.5) * [[0], [1]], target_risk=0.1, procedure="ucb-binomial"
        )


def monotone_table(rng, n=300, rows=30):
    """Per-sample monotone 0-1 losses: sample i fails from row r_i on."""
    start = rng.integers(1, rows * 3, size=n)
    return (np.arange(rows)[:, None] >= start[None, :]).astype(float)


@pytest.mark.parametrize("procedure", PROCEDURES)
def test_selection_is_monotone_in_target_risk(procedure, rng):
    table = monotone_table(rng)
    eps = np.linspace(0.01, 0.5, 25)
    index, certified = selections(table[None], eps, procedure=procedure, delta=0.1, loss_bound=1.0)
    assert np.all(np.diff(index[0]) >= 0)
    assert np.all(index[0][~certified[0]] == 0) or procedure == "naive"


@pytest.mark.parametrize("procedure", PROCEDURES)
def test_vectorised_selection_equals_single_calls(procedure, rng):
    table = monotone_table(rng)
    eps = np.array([0.02, 0.1, 0.3])
    index, certified = selections(table[None], eps, procedure=procedure, delta=0.1, loss_bound=1.0)
    for e, target in enumerate(eps):
        policy = pick(table, procedure, target, order="given")
        assert (policy.index, policy.certified) == (index[0, e], certified[0, e])


def test_list_and_array_inputs_agree():
    a = pick(TABLE.tolist(), "crc", 0.6)
    b = pick(TABLE, "crc", 0.6)
    assert a == b


def test_procedure_names():
    assert canonical_procedure("ucb") == "ucb-wsr"
    with pytest.raises(ValueError, match=r"`procedure` must be one of .*got 'ucb-bernstein'"):
        canonical_procedure("ucb-bernstein")


@pytest.mark.parametrize("procedure", PROCEDURES)
def test_a_grid_with_only_the_full_model(procedure):
    policy = pick(np.zeros((1, 20)), procedure, 0.1)
    assert (policy.index, policy.certified, policy.is_full_model) == (0, False, True)


def test_a_seed_repeats_the_calibration_and_the_file_order_is_not_read(rng):
    table = monotone_table(rng, n=200)
    easy_first = table[:, np.argsort(table.sum(axis=0))]
    assert pick(easy_first, "ucb-wsr", 0.1, seed=9) == pick(easy_first, "ucb-wsr", 0.1, seed=9)
    # Read in the file's order, the sorted file is a different (and unsafe) sequence.
    given = pick(easy_first, "ucb-wsr", 0.1, order="given").index
    assert given > max(pick(easy_first, "ucb-wsr", 0.1, seed=s).index for s in range(5))


def test_the_reading_order_does_not_look_at_the_data(rng):
    from exitguard.risk.procedures import reading_order

    a, b = rng.random((4, 50)), np.sort(rng.random((4, 50)), axis=1)
    order_a = reading_order(a, np.random.default_rng(3))
    order_b = reading_order(b, np.random.default_rng(3))
    np.testing.assert_array_equal(order_a, order_b)  # a permutation drawn independently of the data
    np.testing.assert_array_equal(order_a, np.random.default_rng(3).permutation(50))


def test_reading_order_is_a_permutation(rng):
    from exitguard.risk.procedures import in_order, reading_order

    tables = rng.random((3, 4, 50))
    order = reading_order(tables, [np.random.default_rng(s) for s in range(3)])
    assert order.shape == (3, 50)
    assert all(sorted(row) == list(range(50)) for row in order)
    read = in_order(tables, order)
    np.testing.assert_allclose(np.sort(read, axis=-1), np.sort(tables, axis=-1))
    with pytest.raises(ValueError, match="one generator per table"):
        reading_order(tables, [np.random.default_rng(0)])
