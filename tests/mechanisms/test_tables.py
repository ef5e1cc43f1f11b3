"""Mechanism tables against loops written out, certification through the core, and errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from exitguard.calibration import RiskNotControlledWarning, calibrate_table
from exitguard.risk import bounds
from exitguard.tasks.mechanisms.tables import (
    BudgetRiskCurve,
    MechanismPolicy,
    MechanismTable,
    budget_risk_curve,
    budget_table,
    certify,
    config_table,
    evaluate_table,
    exit_rule_table,
)

RISKS = ("prediction_gap", "prediction_consistency")


def _outputs(n: int = 60, steps: int = 3, classes: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(classes, 0.5), size=(n, steps))  # (n, L, C)
    labels = rng.integers(0, classes, n)
    conf = rng.random((n, steps))
    return probs, labels, conf


def _loss(name, probs_taken, probs_full, label):
    """The loss of one sample, written out: 0-1 against the label or the full model."""
    if name == "prediction_gap":
        return float(probs_taken.argmax() != label) - float(probs_full.argmax() != label)
    return float(probs_taken.argmax() != probs_full.argmax())


def test_exit_rule_table_equals_a_loop():
    probs, labels, conf = _outputs()
    thresholds = np.array([math.inf, 0.9, 0.6, 0.3, 0.0])
    exit_cost = np.array([10.0, 25.0, 50.0])
    table = exit_rule_table(
        "cascade", conf, probs, labels, exit_cost=exit_cost, full_cost=40.0, thresholds=thresholds
    )
    for k, threshold in enumerate(thresholds):
        for i in range(len(labels)):
            exit_ = 2
            for step in range(2):  # the exit rule, by hand
                if conf[i, step] >= threshold:
                    exit_ = step
                    break
            assert table.exits[k, i] == exit_
            assert table.cost[k, i] == (40.0 if k == 0 else exit_cost[exit_])
            for r, name in enumerate(RISKS):
                expected = _loss(name, probs[i, exit_], probs[i, 2], labels[i])
                assert table.losses[r, k, i] == expected
    np.testing.assert_array_equal(table.values, thresholds)
    assert table.full_cost == 40.0 and table.ordered


def test_budget_table_answers_from_ever_earlier_exits():
    probs, labels, _ = _outputs()
    table = budget_table(probs, labels, budget_cost=[5.0, 9.0, 20.0])
    np.testing.assert_array_equal(table.values, [20.0, 9.0, 5.0])
    for k in range(3):
        exit_ = 2 - k
        assert (table.exits[k] == exit_).all()
        assert (table.cost[k] == [5.0, 9.0, 20.0][exit_]).all()
        for i in range(len(labels)):
            for r, name in enumerate(RISKS):
                assert table.losses[r, k, i] == _loss(name, probs[i, exit_], probs[i, 2], labels[i])


def test_config_table_compares_every_configuration_with_configuration_zero():
    probs, labels, _ = _outputs(steps=4)
    cost = np.arange(4 * 60, dtype=float).reshape(4, 60)
    table = config_table(
        "layer skipping",
        probs,
        labels,
        cost=cost,
        values=[0.0, 0.2, 0.5, 0.7],
        parameter="gate threshold",
    )
    assert not table.ordered and table.exits is None
    for k in range(4):
        for i in range(60):
            for r, name in enumerate(RISKS):
                assert table.losses[r, k, i] == _loss(name, probs[i, k], probs[i, 0], labels[i])
    np.testing.assert_array_equal(table.cost, cost)


def _skip_table(n: int = 200, seed: int = 1) -> MechanismTable:
    probs, labels, _ = _outputs(n=n, steps=5, seed=seed)
    probs[:, 1] = probs[:, 0]  # a configuration equal to the full model
    return config_table(
        "layer skipping",
        probs,
        labels,
        cost=np.tile(np.linspace(1.0, 0.2, 5)[:, None], (1, n)),
        values=[0.0, 0.1, 0.2, 0.3, 0.4],
        parameter="gate threshold",
    )


def test_certify_is_the_core_on_one_risk():
    table = _skip_table()
    for risk in RISKS:
        policy = certify(table, risk=risk, target_risk=0.3, delta=0.1, procedure="ltt")
        core = calibrate_table(
            table.loss(risk), target_risk=0.3, delta=0.1, procedure="ltt", cost=table.cost
        )
        assert policy.index == core.index
        assert policy.value == table.values[core.index]
        assert policy.policy.expected_cost == core.expected_cost
    assert (
        certify(table, risk="prediction_consistency", target_risk=0.2, procedure="ltt").index >= 1
    )


def test_mechanism_policy_round_trips_through_json():
    table = _skip_table()
    policy = certify(
        table, risk="prediction_consistency", target_risk=0.2, procedure="ucb-wsr", seed=3
    )
    again = MechanismPolicy.from_dict(json.loads(json.dumps(policy.to_dict())))
    assert again == policy
    assert "layer skipping" in repr(policy)
    probs, labels, conf = _outputs()
    full = exit_rule_table("cascade", conf, probs, labels, exit_cost=[1.0, 2.0, 3.0], full_cost=3.0)
    with pytest.warns(RiskNotControlledWarning):
        never = certify(full, risk="prediction_gap", target_risk=0.01, procedure="ucb-hb")
    assert math.isinf(never.value) and not never.certified
    assert MechanismPolicy.from_dict(json.loads(json.dumps(never.to_dict()))) == never


def test_table_save_and_load(tmp_path):
    probs, labels, conf = _outputs()
    table = exit_rule_table(
        "learned halting", conf, probs, labels, exit_cost=[1.0, 2.0, 3.0], full_cost=3.0
    )
    again = MechanismTable.load(table.save(tmp_path / "table.npz"))
    for field in ("mechanism", "parameter", "risks", "loss_bounds", "ordered"):
        assert getattr(again, field) == getattr(table, field)
    for field in ("values", "losses", "cost", "exits"):
        np.testing.assert_array_equal(getattr(again, field), getattr(table, field))
    skip = _skip_table()
    assert MechanismTable.load(skip.save(tmp_path / "skip.npz")).exits is None


def test_budget_risk_curve_is_bonferroni_over_the_early_exits():
    probs, labels, _ = _outputs(n=300, steps=4)
    budgets = [1.0, 2.0, 4.0, 8.0]
    curve = budget_risk_curve(
        probs, labels, risk="prediction_consistency", budget_cost=budgets, delta=0.1, bound="hb"
    )
    full = probs[:, -1].argmax(-1)
    losses = np.stack([(probs[:, e].argmax(-1) != full).astype(float) for e in range(4)])
    np.testing.assert_allclose(curve.empirical_risk, losses.mean(axis=1))
    expected = bounds.upper_bounds(losses[:3], bound="hb", delta=0.1 / 3, loss_bound=1.0)
    np.testing.assert_allclose(curve.upper_bound[:3], expected)
    assert curve.upper_bound[3] == 0.0 and curve.empirical_risk[3] == 0.0
    assert all(u >= m for u, m in zip(curve.upper_bound, curve.empirical_risk, strict=True))
    eps = curve.upper_bound[1] + 1e-9
    assert curve.smallest_budget(eps) == min(
        b for b, u in zip(budgets, curve.upper_bound, strict=True) if u <= eps
    )
    wsr = budget_risk_curve(probs, labels, budget_cost=budgets, seed=4)
    assert wsr.order_seed == 4 and wsr.bound == "wsr"
    assert BudgetRiskCurve.from_dict(json.loads(json.dumps(wsr.to_dict()))) == wsr


def test_the_tables_import_no_torch():
    code = "import sys, exitguard.tasks.mechanisms.tables; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- errors


def test_procedures_that_assume_a_monotone_risk_are_refused_for_skipping():
    table = _skip_table()
    message = r"`procedure` 'crc-marginal' assumes a risk monotone along the grid"
    with pytest.raises(ValueError, match=message):
        certify(table, risk="prediction_gap", target_risk=0.1, procedure="crc-marginal")
    with pytest.raises(ValueError, match=message):
        evaluate_table(table, risk="prediction_gap", procedures=("ltt", "crc-marginal"))
    evaluate_table(table, risk="prediction_gap", procedures=("crc", "ucb-wsr", "ltt"), trials=5)


def test_bad_tables_are_refused():
    probs, labels, conf = _outputs()
    with pytest.raises(ValueError, match=r"`probs` must have shape \(n, L, C\)"):
        exit_rule_table("x", conf[:, :2], probs, labels, exit_cost=[1, 2, 3], full_cost=3.0)
    with pytest.raises(ValueError, match=r"`exit_cost` must have shape \(3,\)"):
        exit_rule_table("x", conf, probs, labels, exit_cost=[1, 2], full_cost=3.0)
    with pytest.raises(ValueError, match="`budget_cost` must hold 3 increasing costs"):
        budget_table(probs, labels, budget_cost=[1.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="`risks` must name at least one risk"):
        budget_table(probs, labels, risks=(), budget_cost=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"`cost` must have shape \(3, 60\)"):
        config_table("x", probs, labels, cost=np.ones((3, 5)), values=[0, 1, 2], parameter="t")
    table = budget_table(probs, labels, budget_cost=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="`risk` must be one of 'prediction_gap', 'prediction"):
        table.loss("distribution_gap")
    with pytest.raises(ValueError, match="row 0 of every loss table must be the full model"):
        MechanismTable(
            mechanism="x",
            parameter="t",
            values=np.zeros(2),
            risks=("prediction_gap",),
            loss_bounds=(1.0,),
            losses=np.ones((1, 2, 5)),
            cost=np.ones((2, 5)),
            ordered=True,
        )
    with pytest.raises(ValueError, match="`labels` are required"):
        budget_table(probs, None, budget_cost=[1.0, 2.0, 3.0])
