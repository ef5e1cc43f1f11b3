"""Oracle tests: every bound and p-value against hand, scipy or slow reference computations."""

import math

import numpy as np
import pytest
from scipy import optimize, stats

from exitguard.risk import bounds


def test_hoeffding_closed_form():
    losses = np.array([[0.5, -0.5, 1.0, 0.0]])
    expected = 0.25 + 2 * 1.0 * math.sqrt(math.log(10) / 8)
    np.testing.assert_allclose(bounds.hoeffding_ucb(losses, delta=0.1, loss_bound=1.0), [expected])
    p = bounds.hoeffding_p_value(losses, 0.9, loss_bound=2.0)
    np.testing.assert_allclose(p, [math.exp(-2 * 4 * 0.65**2 / 16)])
    assert bounds.hoeffding_p_value(losses, 0.1, loss_bound=1.0)[0] == 1.0  # mean above alpha


def _hb_by_hand(r: float, n: int, alpha: float) -> float:
    a = min(r, alpha)
    h1 = (a * math.log(a / alpha) if a > 0 else 0.0) + (1 - a) * math.log((1 - a) / (1 - alpha))
    return min(math.exp(-n * h1), math.e * stats.binom.cdf(math.ceil(n * r), n, alpha))


@pytest.mark.parametrize(
    ("r", "n", "alpha"), [(0.02, 100, 0.05), (0.1, 50, 0.2), (0.3, 1000, 0.32)]
)
def test_hoeffding_bentkus_p_value_by_hand(r, n, alpha):
    got = bounds.hoeffding_bentkus_p_value(r, alpha, n=n)
    assert got == pytest.approx(_hb_by_hand(r, n, alpha), rel=1e-12)


def test_hoeffding_bentkus_at_zero_risk_has_no_nan():
    # The Hoeffding term's 0 log 0 limit is (1 - alpha)^n, smaller than Bentkus' e (1 - alpha)^n.
    got = bounds.hoeffding_bentkus_p_value(0.0, 0.05, n=100)
    assert got == pytest.approx(0.95**100, rel=1e-12)
    assert np.isfinite(bounds.hoeffding_bentkus_ucb(np.zeros(3), n=10, delta=0.1)).all()


def test_hoeffding_bentkus_ucb_inverts_the_p_value():
    for r in (0.0, 0.03, 0.2):
        ucb = float(bounds.hoeffding_bentkus_ucb(r, n=200, delta=0.1))
        root = optimize.brentq(lambda a, r=r: _hb_by_hand(r, 200, a) - 0.1, max(r, 1e-9), 0.999)
        assert ucb == pytest.approx(root, abs=1e-9)


def test_binomial_against_scipy():
    k, n, delta = 7, 120, 0.1
    assert bounds.binomial_p_value(k / n, 0.1, n=n) == pytest.approx(stats.binom.cdf(k, n, 0.1))
    # A one-sided (1 - delta) upper bound is the upper end of a two-sided (1 - 2 delta) interval.
    exact = stats.binomtest(k, n).proportion_ci(confidence_level=1 - 2 * delta, method="exact")
    assert bounds.binomial_ucb(k / n, n=n, delta=delta) == pytest.approx(exact.high, rel=1e-10)
    assert bounds.binomial_ucb(1.0, n=n, delta=delta) == 1.0


def wsr_reference(losses: np.ndarray, delta: float, loss_bound: float, step: float = 1e-4) -> float:
    """The paper's Algorithm 2, one row at a time, scanning mu on a grid."""
    n = len(losses)
    cap = 1.0 / loss_bound
    mu_hat, sigma2 = [], []
    total, squares = 0.0, 0.0
    for i, x in enumerate(losses):
        total += x
        mu_hat.append((0.5 + total) / (i + 2))
        squares += (x - mu_hat[-1]) ** 2
        sigma2.append((0.25 + squares) / (i + 2))
    previous = [0.25, *sigma2[:-1]]
    nu = [min(cap, math.sqrt(2 * math.log(1 / delta) / (n * s))) for s in previous]
    for mu in np.arange(0.0, loss_bound, step):
        wealth, best = 1.0, 0.0
        for x, bet in zip(losses, nu, strict=True):
            wealth *= 1 - bet * (x - mu)
            best = max(best, wealth)
        if best >= 1 / delta:
            return float(mu)
    return loss_bound


@pytest.mark.parametrize("loss_bound", [1.0, 2.0])
def test_wsr_matches_algorithm_2(loss_bound):
    rng = np.random.default_rng(3)
    rows = [
        rng.uniform(-0.2, 0.6, 60) * loss_bound,
        np.clip(rng.normal(0.1, 0.2, 80), -1, 1) * loss_bound,
        np.zeros(50),
        rng.choice([-1.0, 0.0, 1.0], size=70, p=[0.1, 0.7, 0.2]) * loss_bound,
    ]
    for row in rows:
        got = float(bounds.wsr_ucb(row[None], delta=0.1, loss_bound=loss_bound)[0])
        expected = wsr_reference(row, 0.1, loss_bound)
        assert got == pytest.approx(expected, abs=1.5e-4), row[:5]


def test_wsr_p_value_and_ucb_agree(rng):
    losses = np.clip(rng.normal(0.05, 0.3, size=(40, 150)), -1, 1)
    ucb = bounds.wsr_ucb(losses, delta=0.1, loss_bound=1.0)
    for eps in (0.02, 0.05, 0.1, 0.2):
        p = bounds.wsr_p_value(losses, eps, delta=0.1, loss_bound=1.0)
        np.testing.assert_array_equal(ucb < eps - 1e-12, p < 0.1)


def test_wsr_with_half_cap_can_certify_negative_risk():
    losses = np.full((1, 400), -0.5)
    full = bounds.wsr_ucb(losses, delta=0.1, loss_bound=1.0)
    half = bounds.wsr_ucb(losses, delta=0.1, loss_bound=1.0, bet_cap=0.5)
    assert full[0] == pytest.approx(0.0, abs=1e-12)  # cap 1/B: the risk is taken to be >= 0
    assert -0.5 < half[0] < 0.0
    with pytest.raises(ValueError, match=r"`bet_cap` must lie in \(0, 1/loss_bound\]"):
        bounds.wsr_ucb(losses, delta=0.1, loss_bound=1.0, bet_cap=2.0)


@pytest.mark.parametrize("bound", ["hoeffding", "hb", "wsr", "binomial"])
def test_p_values_shrink_as_alpha_grows(bound, rng):
    losses = (rng.random((5, 200)) < 0.05).astype(float)
    alphas = np.linspace(0.06, 0.5, 12)
    p = bounds.p_values(losses[:, None, :], alphas[None, :], bound=bound, delta=0.1, loss_bound=1.0)
    assert p.shape == (5, 12)
    assert np.all(np.diff(p, axis=1) <= 1e-12)
    assert p.min() >= 0 and p.max() <= 1


@pytest.mark.parametrize("bound", ["hoeffding", "hb", "wsr", "binomial"])
def test_upper_bounds_cover_the_true_mean(bound, rng):
    # 2000 independent rows of Bernoulli(0.1) losses: the share of rows whose UCB falls
    # below 0.1 must be consistent with delta (one-sided binomial test).
    losses = (rng.random((2000, 100)) < 0.1).astype(float)
    ucb = bounds.upper_bounds(losses, bound=bound, delta=0.1, loss_bound=1.0)
    assert np.all(ucb <= 1.0)
    misses = int(np.sum(ucb < 0.1))
    assert stats.binomtest(misses, 2000, 0.1, alternative="greater").pvalue > 1e-3


def test_unknown_bound():
    with pytest.raises(ValueError, match="`bound` must be one of"):
        bounds.p_values(np.zeros((1, 3)), 0.1, bound="bernstein", delta=0.1, loss_bound=1.0)
