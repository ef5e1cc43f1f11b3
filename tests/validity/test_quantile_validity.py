"""Validity of CVaR certification over repeated calibration draws with known CVaR.

Row k's losses are Uniform(0, a_k), whose CVaR at level beta is exactly a_k (1 + beta) / 2.
The grid climbs to a plateau of rows whose CVaR lies just above epsilon (the hardest case
for fixed-sequence testing: every plateau row is nearly safe). Each draw is a fresh i.i.d.
calibration set; a violation is a draw whose selected row has a true CVaR above epsilon. The
violation count must be consistent with a rate <= delta (one-sided binomial test at level
0.001). The negative control, "the last row whose empirical CVaR is below epsilon", violates
in most draws, and the same check catches it. A few seconds on two cores.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from exitguard.risk.quantile import certify_cvar, cvar

DELTA = 0.1
BETA = 0.9
EPSILON = 0.1
BOUND = 0.25  # losses at most 0.25: Uniform(0, a) with a <= 0.25
# CVaR = 0.95 a: rows below epsilon up to a = 0.105, then a plateau just above it.
WIDTHS = np.array([0.0, 0.02, 0.04, 0.06, 0.08, 0.1, 0.105, 0.10532, 0.10532, 0.10532, 0.2, 0.25])
TRUE_CVAR = WIDTHS * (1 + BETA) / 2


def check(violations: int, draws: int, label: str) -> None:
    p = stats.binomtest(violations, draws, DELTA, alternative="greater").pvalue
    assert p > 1e-3, f"{label}: {violations}/{draws} violations (p = {p:.2g})"


def draws(n: int, count: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield WIDTHS[:, None] * rng.uniform(size=(len(WIDTHS), n))  # (K, n)


@pytest.mark.parametrize("n", [2000, 5000])
def test_certified_cvar_keeps_its_promise(n):
    count = 300
    violations, certified = 0, 0
    for table in draws(n, count, seed=n):
        selection = certify_cvar(
            table, beta=BETA, target_risk=EPSILON, delta=DELTA, loss_bound=BOUND
        )
        violations += int(TRUE_CVAR[selection.index] > EPSILON)
        certified += int(selection.certified)
    check(violations, count, f"CVaR n={n}")
    assert certified > count / 2  # not vacuous: early-exit rows are certified


def test_picking_by_the_empirical_cvar_violates_and_the_check_catches_it():
    count, violations = 300, 0
    for table in draws(2000, count, seed=7):
        below = np.flatnonzero(cvar(table, beta=BETA) <= EPSILON)
        violations += int(TRUE_CVAR[below.max()] > EPSILON)
    assert violations / count > 0.5
    with pytest.raises(AssertionError, match="violations"):
        check(violations, count, "naive")
