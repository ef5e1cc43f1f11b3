"""Validity when the calibration file is ordered adversarially.

Population (the setting in which the order hole was found): 11 rows with true risks 0, 0.02,
..., 0.2 of nested 0-1 losses; sample ``i`` has a difficulty ``u_i`` uniform on (0, 1) and
fails at row ``k`` when ``u_i < R_k``, so it fails at every row from its own difficulty on.
Every draw is a fresh i.i.d. calibration set of ``n`` samples, written to the file in one of
four orders: as drawn, sorted from easy to hard, sorted from hard to easy, or grouped by a
class label that is correlated with difficulty. The selected row's *true* risk is compared
with epsilon.

With the samples read in the file's order, the Waudby-Smith-Ramdas bound certifies a row
whose true risk exceeds epsilon in nearly every draw of an easy-to-hard file (its bets grow
while only zero losses have been seen, and its wealth keeps its running maximum):
:func:`test_the_sorted_file_breaks_the_bound_read_in_file_order` shows it. Read in a seeded
random permutation drawn from a fresh seed (the default), every procedure keeps its guarantee
in every order. A seed fixed in advance is a fixed permutation: valid for files in random order
(:func:`test_a_fixed_seed_is_valid_for_files_in_random_order`), not for sorted ones.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from exitguard.evaluation import selections
from exitguard.risk.procedures import PROCEDURES, get_procedure

DELTA = 0.1
EPS = 0.05
RISKS = np.linspace(0.0, 0.2, 11)
ORDERS = ["as-drawn", "easy-first", "hard-first", "by-class"]
GUARANTEED = [p for p in PROCEDURES if get_procedure(p).has_guarantee]


def draw_files(order: str, n: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """Calibration files (draws, K, n) of nested 0-1 losses, columns in the given order."""
    difficulty = rng.random((draws, n))  # u_i: fails at row k when u_i < RISKS[k]
    if order == "easy-first":
        key = -difficulty
    elif order == "hard-first":
        key = difficulty
    elif order == "by-class":  # 10 classes, a noisy function of difficulty
        key = np.floor(10 * np.clip(difficulty + rng.normal(0, 0.1, difficulty.shape), 0, 0.99))
    else:
        key = np.zeros_like(difficulty)
    ordered = np.take_along_axis(difficulty, np.argsort(key, axis=1, kind="stable"), axis=1)
    return (ordered[:, None, :] < RISKS[None, :, None]).astype(float)  # (draws, K, n)


def chosen_risks(procedure, order, *, n, draws, seed, read="random"):
    """``read``: "random" (a fresh seed per draw), "given" (file order) or "fixed" (one seed)."""
    rng = np.random.default_rng(seed)
    files = draw_files(order, n, draws, rng)
    order_seeds = {
        "random": rng.integers(0, 2**53, size=draws),
        "fixed": np.full(draws, 12345),
        "given": None,
    }[read]
    index, _ = selections(
        files,
        np.array([EPS]),
        procedure=procedure,
        delta=DELTA,
        loss_bound=1.0,
        order_seeds=order_seeds,
    )
    return RISKS[index[:, 0]]


def check(procedure, order, *, n, draws, seed, read="random"):
    risks = chosen_risks(procedure, order, n=n, draws=draws, seed=seed, read=read)
    if get_procedure(procedure).is_high_probability:
        violations = int(np.sum(risks > EPS + 1e-12))
        p = stats.binomtest(violations, draws, DELTA, alternative="greater").pvalue
        assert p > 1e-3, f"{procedure}, {order}: {violations}/{draws} violations (p = {p:.2g})"
        return violations / draws
    error = max(risks.std(ddof=1), 1e-12) / np.sqrt(draws)
    assert risks.mean() <= EPS + 3 * error, f"{procedure}, {order}: mean risk {risks.mean():.4f}"
    return risks.mean()


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("procedure", GUARANTEED)
def test_every_guarantee_holds_in_every_file_order(procedure, order):
    check(procedure, order, n=200, draws=300, seed=5)


def test_the_sorted_file_breaks_the_bound_read_in_file_order():
    """The hole, reproduced: WSR reading an easy-to-hard file in file order (the old default)."""
    risks = chosen_risks("ucb-wsr", "easy-first", n=200, draws=300, seed=5, read="given")
    assert np.mean(risks > EPS) > 0.9
    with pytest.raises(AssertionError, match="violations"):
        check("ucb-wsr", "easy-first", n=200, draws=300, seed=5, read="given")
    # The same files read in a random permutation: back to a rate consistent with delta.
    assert check("ucb-wsr", "easy-first", n=200, draws=300, seed=5) < 0.2


def test_a_fixed_seed_is_valid_for_files_in_random_order():
    """The same seed in every draw (a fixed permutation) keeps the guarantee for i.i.d. files."""
    check("ucb-wsr", "as-drawn", n=200, draws=1000, seed=7, read="fixed")


def test_order_free_procedures_do_not_depend_on_the_order(rng):
    files = draw_files("easy-first", 200, 50, rng)
    shuffled = files[:, :, rng.permutation(200)]
    for procedure in PROCEDURES:
        if get_procedure(procedure).order_dependent:
            continue
        a, _ = selections(files, np.array([EPS]), procedure=procedure, delta=DELTA, loss_bound=1)
        b, _ = selections(shuffled, np.array([EPS]), procedure=procedure, delta=DELTA, loss_bound=1)
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n", [100, 1000])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("procedure", GUARANTEED)
def test_every_guarantee_holds_in_every_file_order_long(procedure, order, n):
    check(procedure, order, n=n, draws=3000, seed=23)
