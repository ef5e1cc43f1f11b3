"""CVaR (exitguard.risk.quantile): oracle values, invariants, and refused input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from exitguard.risk.quantile import (
    CVaRSelection,
    certify_cvar,
    cvar,
    cvar_p_value,
    cvar_upper_bound,
    dkw_width,
)

HAND = np.arange(1, 51) / 100.0  # 0.01 .. 0.50, n = 50
DELTA_W01 = math.exp(-1.0)  # at n = 50 the DKW width sqrt(log(1/delta) / 100) is exactly 0.1


def quantile_integral(losses: np.ndarray, width: float, beta: float, bound: float) -> float:
    """Independent oracle: integrate the quantile function of the band's lower edge."""
    ordered = np.sort(losses)
    n = len(ordered)
    p = beta + (np.arange(400_000) + 0.5) / 400_000 * (1 - beta)  # midpoints of [beta, 1]
    index = np.ceil(n * (p + width)).astype(int)  # smallest i with i/n - width >= p
    q = np.where(index <= n, ordered[np.clip(index, 1, n) - 1], bound)
    return float(q.mean())


def test_cvar_by_hand():
    # The worst 20% of 0.01..0.50 are 0.41..0.50, mean 0.455; beta = 0 is the mean.
    assert cvar(HAND, beta=0.8) == pytest.approx(0.455)
    assert cvar(HAND, beta=0.0) == pytest.approx(HAND.mean())
    # A sample split at the boundary counts with its share: worst 30% of 4 = 1.2 samples.
    assert cvar([0.0, 0.1, 0.5, 1.0], beta=0.7) == pytest.approx((1.0 + 0.2 * 0.5) / 1.2)


def test_upper_bound_by_hand():
    # Width 0.1: the five smallest losses lose their mass, 0.1 moves to B = 1. Above p = 0.8
    # lie 0.46..0.50 (mass 0.02 each) and B (mass 0.1): (0.02 * 2.4 + 0.1) / 0.2 = 0.74.
    assert dkw_width(50, DELTA_W01) == pytest.approx(0.1)
    assert cvar_upper_bound(HAND, beta=0.8, delta=DELTA_W01) == pytest.approx(0.74)
    # With B = 0.6 the moved mass costs less: (0.048 + 0.06) / 0.2 = 0.54.
    assert cvar_upper_bound(HAND, beta=0.8, delta=DELTA_W01, loss_bound=0.6) == pytest.approx(0.54)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 0.97])
@pytest.mark.parametrize("delta", [0.01, 0.1, 0.4, 0.8])
def test_upper_bound_against_an_independent_integration(beta, delta):
    losses = np.random.default_rng(3).uniform(-0.2, 0.6, 300)
    width = float(dkw_width(300, delta))
    expected = quantile_integral(losses, width, beta, 1.0)
    assert cvar_upper_bound(losses, beta=beta, delta=delta) == pytest.approx(expected, abs=1e-4)


def test_dkw_width_uses_massart_one_sided_then_two_sided():
    assert dkw_width(100, 0.1) == pytest.approx(math.sqrt(math.log(10) / 200))
    assert dkw_width(100, 0.8) == pytest.approx(math.sqrt(math.log(2 / 0.8) / 200))


def test_invariants():
    rng = np.random.default_rng(0)
    table = rng.uniform(-0.5, 1.0, (6, 200))
    bound = cvar_upper_bound(table, beta=0.9, delta=0.1)
    assert bound.shape == (6,)
    assert np.all(bound >= cvar(table, beta=0.9))  # never below the empirical CVaR
    assert np.all(bound <= 1.0)  # never above the loss bound
    looser = cvar_upper_bound(table, beta=0.9, delta=0.01)
    assert np.all(looser >= bound)  # more confidence, a wider bound
    shuffled = table[:, rng.permutation(200)]
    np.testing.assert_array_equal(cvar_upper_bound(shuffled, beta=0.9, delta=0.1), bound)
    betas = [cvar(table[0], beta=b) for b in (0.0, 0.5, 0.9, 0.99)]
    assert np.all(np.diff(betas) >= 0)  # a worse tail, a larger CVaR


def test_p_value_agrees_with_the_bound():
    rng = np.random.default_rng(1)
    table = rng.uniform(0.0, 0.3, (5, 2000))
    for target in (0.3, 0.4, 0.6):
        p = cvar_p_value(table, target, beta=0.8)
        for delta in (0.001, 0.01, 0.05, 0.2, 0.45):
            certified = cvar_upper_bound(table, beta=0.8, delta=delta) < target
            np.testing.assert_array_equal(p < delta, certified)
    # At width 0.1 the hand bound is 0.74: just above, p is exp(-1); below the empirical 1.
    assert cvar_p_value(HAND, 0.74 + 1e-9, beta=0.8) == pytest.approx(DELTA_W01, rel=1e-6)
    assert cvar_p_value(HAND, 0.455, beta=0.8) == 1.0


def test_certify_takes_the_run_from_the_full_model():
    rng = np.random.default_rng(2)
    n = 4000
    safe, unsafe = rng.uniform(0, 0.05, n), rng.uniform(0, 0.9, n)
    table = np.stack([np.zeros(n), safe, safe * 2, unsafe, safe])  # row 4 safe after a gap
    result = certify_cvar(table, beta=0.9, target_risk=0.3, delta=0.1, loss_bound=1.0)
    assert result.passed == (True, True, True, False, True)
    assert result.index == 2 and result.certified  # row 4 passes but comes after a failure
    assert result.upper_bound[2] < 0.3 <= result.upper_bound[3]
    nothing = certify_cvar(np.stack([np.zeros(n), unsafe]), beta=0.9, target_risk=0.3)
    assert nothing.index == 0 and not nothing.certified
    assert "nothing certified" in repr(nothing)
    back = CVaRSelection.from_dict(json.loads(json.dumps(result.to_dict())))
    assert back == result


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"beta": 1.0}, ValueError, r"`beta` must lie in \[0, 1\)"),
        ({"beta": True}, TypeError, r"`beta` must be a float"),
        ({"delta": 0.0}, ValueError, r"`delta` must be a float in \(0, 1\)"),
        ({"target_risk": math.nan}, ValueError, r"`target_risk` must be a finite float > 0"),
        ({"loss_bound": 0.1}, ValueError, r"must lie in \[-loss_bound, loss_bound\]"),
    ],
)
def test_refused_input(kwargs, error, message):
    table = np.stack([np.zeros(10), np.linspace(0, 0.5, 10)])
    arguments = {"beta": 0.9, "target_risk": 0.2, "delta": 0.1, "loss_bound": 1.0} | kwargs
    with pytest.raises(error, match=message):
        certify_cvar(table, **arguments)


def test_refused_tables():
    with pytest.raises(ValueError, match=r"`losses` must be finite"):
        cvar_upper_bound([0.1, math.nan], beta=0.5, delta=0.1)
    with pytest.raises(ValueError, match=r"at least one sample"):
        cvar_upper_bound(np.zeros((2, 0)), beta=0.5, delta=0.1)
    with pytest.raises(ValueError, match=r"K >= 2 rows"):
        certify_cvar(np.zeros((1, 5)), beta=0.5, target_risk=0.1)
