"""Inputs that used to give a silently wrong answer: now an error, or correct and said so."""

import math
import warnings

import numpy as np
import pytest

from exitguard import CertifiedAboveTargetWarning, calibrate, calibrate_table
from exitguard.risk.confidence import max_softmax


@pytest.mark.parametrize(
    ("losses", "message"),
    [
        (np.array([[0, 0], [0.5 + 1j, 0]]), "dtype complex128"),
        (np.array([["0", "0"], ["0.5", "0"]]), "dtype <U3"),
        (np.zeros((2, 2), dtype="datetime64[s]"), "dtype datetime64"),
        (np.array([[0, 0], [None, 0]], dtype=object), "dtype object"),
    ],
)
def test_non_real_losses_are_refused(losses, message):
    with pytest.raises(TypeError, match=message):
        calibrate_table(losses, target_risk=0.1)


@pytest.mark.parametrize(
    "grid",
    [
        [math.inf, 0.5, -math.inf],
        [math.inf, 1.5, 0.5],
        [math.inf, 0.5, -0.1],
        [math.inf, math.nan, 0],
    ],
)
def test_thresholds_outside_the_unit_interval_are_refused(grid):
    with pytest.raises(ValueError, match="`thresholds` must"):
        calibrate_table(np.zeros((3, 10)), target_risk=0.1, procedure="naive", thresholds=grid)


def test_row_zero_is_always_saved_as_the_full_model():
    # A grid whose first row has a finite threshold still falls back to "never exit early".
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        policy = calibrate_table(
            np.ones((2, 10)) * [[0], [1]], target_risk=0.1, thresholds=[1.0, 0.5]
        )
    assert policy.index == 0 and math.isinf(policy.threshold) and policy.is_full_model


@pytest.mark.parametrize(
    ("cost", "message"),
    [([1.0, -2.0, 3.0], "`cost` must be >= 0"), ([1.0, math.inf, 3.0], "`cost` must be finite")],
)
def test_nonsense_costs_are_refused(cost, message):
    with pytest.raises(ValueError, match=message):
        calibrate_table(np.zeros((3, 10)), target_risk=0.1, procedure="naive", cost=cost)


def test_a_custom_confidence_needs_a_name(rng):
    probs = rng.dirichlet(np.ones(4), size=(200, 3))
    labels = rng.integers(0, 4, 200)
    with pytest.raises(ValueError, match="needs a name the policy can record"):
        calibrate(probs, labels, target_risk=0.2, confidence=lambda p: p.max(-1))
    with pytest.raises(ValueError, match="not a built-in name"):
        calibrate(
            probs, labels, target_risk=0.2, confidence=lambda p: p.max(-1), confidence_name="margin"
        )
    named = calibrate(
        probs, labels, target_risk=0.2, confidence=lambda p: p.max(-1), confidence_name="top1"
    )
    assert named.confidence == "top1"

    def sharpness(p):
        return max_softmax(p)

    assert calibrate(probs, labels, target_risk=0.2, confidence=sharpness).confidence == "sharpness"


def test_a_certified_row_above_its_target_is_said():
    # Overthinking samples (loss -1) first, then failures: the betting bound, read in this
    # given order, certifies the row although its own mean (0.05) is above epsilon (0.04).
    n = 2000
    row = np.zeros(n)
    row[:1000:2] = -1.0  # 500 samples where the early exit beats the full model
    row[1000:1600] = 1.0  # 600 samples where it loses
    table = np.stack([np.zeros(n), row])
    assert table[1].mean() == pytest.approx(0.05)
    with pytest.warns(CertifiedAboveTargetWarning, match="own calibration risk"):
        policy = calibrate_table(table, target_risk=0.04, procedure="ucb-wsr", order="given")
    assert policy.certified and policy.empirical_risk > 0.04
