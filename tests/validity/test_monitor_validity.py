"""The monitor's guarantees over many streams, with checks that a wrong monitor would fail.

* No drift: audited losses are Bernoulli(epsilon) (the hardest stream for the test of
  "risk <= epsilon": the boundary) or Bernoulli(0.8 epsilon), 500 streams of 3000 audits.
  The e-process must alarm in at most alpha of them (one-sided binomial test), the change
  detector at A = horizon / alpha likewise, and the confidence sequence must cover epsilon
  for the whole stream in at least 1 - alpha of them.
* Drift: the risk jumps to 3 epsilon after 2000 good audits; both alarms must be raised in
  nearly every stream, and soon.
* Negative controls: a gambler who peeks at the current loss before betting, and a change
  detector read as a test (alarm at 1 / alpha), must fail the false-alarm test; a monitor
  that never bets must fail the detection test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from exitguard.risk import monitor as m

EPS, ALPHA, STREAMS, LENGTH = 0.05, 0.05, 500, 3000


def streams(rate: float, seed: int, *, change_at: int | None = None, after: float = 0.0):
    rng = np.random.default_rng(seed)
    x = (rng.random((STREAMS, LENGTH)) < rate).astype(float)
    if change_at is not None:
        x[:, change_at:] = (rng.random((STREAMS, LENGTH - change_at)) < after).astype(float)
    return x


def false_alarms(log_statistic: np.ndarray, threshold: float) -> int:
    return int(np.sum(log_statistic.max(axis=-1) >= math.log(threshold)))


def assert_rate_at_most(count: int, level: float, what: str) -> None:
    p = scipy_stats.binomtest(count, STREAMS, level, alternative="greater").pvalue
    assert p > 1e-3, f"{what}: {count}/{STREAMS} false alarms (p = {p:.2g})"


@pytest.mark.parametrize("rate", [EPS, 0.8 * EPS])
def test_no_false_alarms_beyond_alpha(rate):
    x = streams(rate, seed=1)
    out = m.statistics(x, target_risk=EPS, alpha=ALPHA, loss_min=0.0, loss_max=1.0)
    assert_rate_at_most(false_alarms(out["log_wealth"], 1 / ALPHA), ALPHA, "e-process")
    horizon_threshold = m.detector_threshold(horizon=LENGTH, alpha=ALPHA)
    assert_rate_at_most(false_alarms(out["log_cusum"], horizon_threshold), ALPHA, "e-CUSUM")
    assert_rate_at_most(false_alarms(out["log_sr"], horizon_threshold), ALPHA, "e-SR")
    missed = int(np.sum(~((out["risk_low"] <= rate).all(-1) & (out["risk_high"] >= rate).all(-1))))
    assert_rate_at_most(missed, ALPHA, "confidence sequence")


def test_drift_is_found_soon():
    x = streams(0.8 * EPS, seed=2, change_at=2000, after=3 * EPS)
    out = m.statistics(x, target_risk=EPS, alpha=ALPHA, loss_min=0.0, loss_max=1.0)
    for key, threshold in (("log_wealth", 1 / ALPHA), ("log_cusum", 1e4)):
        hit = out[key][:, 2000:] >= math.log(threshold)
        assert hit.any(-1).mean() > 0.97, key
        delay = np.where(hit.any(-1), hit.argmax(-1), LENGTH)
        assert np.median(delay) < 400, (key, np.median(delay))
        assert not (out[key][:, :2000] >= math.log(threshold)).any(-1).mean() > 0.1


def peeking_bets(losses, **kwargs):
    """Wrong: the bet knows the loss it is about to be paid on."""
    cap = kwargs["settings"].fraction / (kwargs["target_risk"] - kwargs["loss_min"])
    return np.where(losses > kwargs["target_risk"], cap, 0.0)


def test_the_false_alarm_check_catches_a_wrong_gambler(monkeypatch):
    monkeypatch.setattr(m, "bets", peeking_bets)
    x = streams(EPS, seed=1)
    out = m.statistics(x, target_risk=EPS, alpha=ALPHA, loss_min=0.0, loss_max=1.0)
    with pytest.raises(AssertionError, match="false alarms"):
        assert_rate_at_most(false_alarms(out["log_wealth"], 1 / ALPHA), ALPHA, "e-process")


def test_the_false_alarm_check_catches_a_detector_read_as_a_test():
    """Wrong: alarming when e-CUSUM reaches 1 / alpha (its run length is only 1 / alpha)."""
    x = streams(EPS, seed=1)
    out = m.statistics(x, target_risk=EPS, alpha=ALPHA, loss_min=0.0, loss_max=1.0)
    with pytest.raises(AssertionError, match="false alarms"):
        assert_rate_at_most(false_alarms(out["log_cusum"], 1 / ALPHA), ALPHA, "e-CUSUM")


def test_the_detection_check_catches_a_monitor_that_never_bets(monkeypatch):
    monkeypatch.setattr(m, "bets", lambda losses, **kwargs: np.zeros(losses.shape))
    x = streams(0.8 * EPS, seed=2, change_at=2000, after=3 * EPS)
    out = m.statistics(x, target_risk=EPS, alpha=ALPHA, loss_min=0.0, loss_max=1.0)
    hit = out["log_wealth"][:, 2000:] >= math.log(1 / ALPHA)
    assert hit.any(-1).mean() == 0.0
