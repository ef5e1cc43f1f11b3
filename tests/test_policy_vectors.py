"""Policies with a threshold vector, a threshold function or several risks: JSON, checks, apply."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from exitguard.policy import (
    ExitPolicy,
    PolicyFileError,
    RiskPromise,
    _canonical,
    load_policy,
    multi_guarantee_text,
)
from exitguard.risk.configurations import ThresholdFamily
from exitguard.risk.exits import exit_index
from exitguard.risk.procedures import get_procedure

V2_FILE = Path(__file__).parent / "data" / "policy-v2.json"  # written by exitguard 0.1 (main)


def vector_policy(**changes) -> ExitPolicy:
    """A certified two-risk vector policy, as calibrate_pareto writes one."""
    risks = (
        RiskPromise("prediction_consistency", 0.05, 1.0, 0.02, 0.001, 0.04),
        RiskPromise("distribution_consistency", 0.1, 1.0, 0.03, 0.01, 0.07, tolerance=0.2),
    )
    fields = {
        "threshold": None,
        "index": 3,
        "procedure": "ucb-wsr",
        "guarantee": "",
        "target_risk": 0.05,
        "delta": 0.1,
        "n": 1000,
        "empirical_risk": 0.02,
        "upper_bound": 0.04,
        "p_value": 0.001,
        "expected_cost": 2.5,
        "full_cost": 4.0,
        "certified": True,
        "loss_bound": 1.0,
        "risk": "prediction_consistency",
        "confidence": "max_softmax",
        "n_exits": 4,
        "sample_order": "random",
        "order_seed": 11,
        "thresholds": (0.9, math.inf, 0.6),
        "risks": risks,
        "pareto": "split",
        "n_opt": 500,
    }
    fields.update(changes)
    if "guarantee" not in changes:  # the guarantee of the fields as changed
        promises = fields["risks"] or (
            RiskPromise(*(fields[name] for name in SCALARS[:4]), fields["p_value"], None),
        )
        fields["guarantee"] = (
            multi_guarantee_text(fields["procedure"], promises, 0.1, fields["pareto"])
            if fields["risks"] or fields["pareto"]
            else get_procedure(fields["procedure"]).guarantee_text(fields["target_risk"], 0.1)
        )
    return ExitPolicy(**fields)


SCALARS = ("risk", "target_risk", "loss_bound", "empirical_risk", "p_value", "upper_bound")


def function_policy() -> ExitPolicy:
    return dataclasses.replace(
        ExitPolicy.load(V2_FILE), threshold_function=ThresholdFamily("scaled", 1.0)
    )


def test_version_2_files_still_load_with_their_digest():
    policy = load_policy(V2_FILE)
    assert policy.kind == "scalar" and policy.thresholds is None and policy.risks == ()
    written = json.loads(V2_FILE.read_text())
    assert policy.to_dict() == written  # the same fields, version and digest
    assert policy.digest == written["digest"]
    np.testing.assert_array_equal(policy.exit_thresholds(), [policy.threshold] * 3)


@pytest.mark.parametrize("make", [vector_policy, function_policy])
def test_json_round_trip_digest_and_signature(tmp_path, make):
    policy = make()
    data = policy.to_dict()
    assert data["schema_version"] == 3
    assert ExitPolicy.from_dict(json.loads(json.dumps(data))) == policy
    key = "k" * 32
    path = policy.save(tmp_path / "p.json", key=key)
    assert ExitPolicy.load(path, key=key) == policy
    tampered = json.loads(path.read_text())
    if "thresholds" in tampered:
        tampered["thresholds"][0] = 0.1  # a lower first threshold: exits earlier than certified
    else:
        tampered["threshold_function"]["tau"] = 3.0
    with pytest.raises(PolicyFileError, match="do not match its `digest`"):
        ExitPolicy.from_dict(tampered)


def test_vector_json_spells_disabled_exits_never():
    data = vector_policy().to_dict()
    assert data["thresholds"] == [0.9, "never", 0.6]
    assert data["threshold"] is None and data["pareto"] == "split" and data["n_opt"] == 500
    assert [r["tolerance"] for r in data["risks"]] == [None, 0.2]


def test_exit_thresholds_of_every_kind():
    np.testing.assert_array_equal(vector_policy().exit_thresholds(), [0.9, math.inf, 0.6])
    function = function_policy()
    expected = ThresholdFamily("scaled", 1.0).vector(function.threshold, 4)
    np.testing.assert_array_equal(function.exit_thresholds(), expected)
    assert expected[0] == function.threshold and expected[2] < expected[1] < expected[0]
    full = vector_policy().full_model()
    assert full.is_full_model and full.exit_thresholds().tolist() == [math.inf] * 3
    assert full.risks[1].p_value is None and not full.certified
    with pytest.raises(ValueError, match="calibrated for 4"):
        vector_policy().exit_thresholds(5)


def test_apply_uses_the_vector_and_the_tail_indicator(rng):
    n, n_exits, classes = 300, 4, 3
    probs = rng.dirichlet(np.full(classes, 0.4), size=(n, n_exits))  # (n, L, C)
    mean = vector_policy(
        risk="distribution_consistency", loss_bound=2.0, risks=(), pareto=None, n_opt=None
    )
    applied = mean.apply(probs, rng=0)
    scores = probs.max(axis=-1)
    np.testing.assert_array_equal(applied.exits, exit_index(scores, [0.9, math.inf, 0.6]))
    assert not np.any(applied.exits == 1)  # the disabled exit is never taken
    assert applied.losses.max() > 0.2 > 0.0 < applied.losses.mean()
    tail_risks = (
        RiskPromise("distribution_consistency", 0.05, 1.0, 0.02, 0.001, 0.04, tolerance=0.2),
        RiskPromise("prediction_consistency", 0.1, 1.0, 0.03, 0.01, 0.07),
    )
    tail = vector_policy(risk="distribution_consistency", risks=tail_risks)
    indicator = tail.apply(probs, rng=0).losses
    np.testing.assert_array_equal(indicator, (applied.losses > 0.2).astype(float))


def test_from_thresholds_is_an_uncertified_hand_choice():
    policy = ExitPolicy.from_thresholds([0.8, math.inf], risk="prediction_gap")
    assert policy.kind == "vector" and not policy.certified and policy.procedure == "naive"
    assert ExitPolicy.from_dict(policy.to_dict()) == policy
    assert ExitPolicy.from_thresholds([math.inf, math.inf]).is_full_model
    assert ExitPolicy.from_thresholds(0.7).kind == "scalar"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"thresholds": (0.9, 0.6)}, r"one threshold per exit but the last: shape \(3,\)"),
        ({"thresholds": (0.9, 1.2, 0.6)}, r"`thresholds` must be a float in \[0, 1\] or inf"),
        ({"threshold": 0.5}, "one of a scalar `threshold`"),
        ({"thresholds": (math.inf,) * 3}, "row 0 is the full model"),
        ({"index": 0}, "row 0 is the full model"),
        ({"risks": ()}, None),  # one mean risk with Pareto provenance: valid
        ({"empirical_risk": 0.03}, "first of `risks` must repeat"),
        ({"pareto": "elsewhere"}, "`pareto` must be"),
        ({"n_opt": None}, "`n_opt`"),
        ({"n_opt": 1000}, r"must be below `n` \(1000\)"),
        ({"procedure": "crc"}, "needs a fixed-sequence procedure"),
        ({"guarantee": "P(R <= 0.05) >= 0.9"}, "`guarantee` does not state"),
    ],
)
def test_inconsistent_policies_are_refused(changes, message):
    if message is None:
        assert vector_policy(**changes).promises[0].risk == "prediction_consistency"
        return
    with pytest.raises((ValueError, TypeError), match=message):
        vector_policy(**changes)


def test_certified_needs_every_risk_to_pass():
    risks = vector_policy().risks
    failing = (risks[0], dataclasses.replace(risks[1], upper_bound=0.12, p_value=0.2))
    with pytest.raises(ValueError, match=r"every risk's `upper_bound` below its target"):
        vector_policy(risks=failing)
    ltt = tuple(dataclasses.replace(r, upper_bound=None) for r in failing)
    with pytest.raises(ValueError, match=r"every risk's `p_value` at most delta"):
        vector_policy(risks=ltt, procedure="ltt", upper_bound=None)


def test_files_must_be_in_the_written_form():
    data = vector_policy().to_dict()
    old = json.loads(V2_FILE.read_text())
    old["thresholds"] = [0.5, 0.5, 0.5]  # a version 2 file cannot hold the new fields
    with pytest.raises(PolicyFileError, match="unknown policy fields for schema version 2"):
        ExitPolicy.from_dict(old)
    classic = dict(json.loads(V2_FILE.read_text()), schema_version=3)  # no new field: not v3
    classic.pop("digest")
    classic["digest"] = "sha256:" + hashlib.sha256(_canonical(classic)).hexdigest()
    with pytest.raises(PolicyFileError, match="not in the form exitguard writes"):
        ExitPolicy.from_dict(classic)
    data["risks"][1]["colour"] = "red"
    with pytest.raises(PolicyFileError):
        ExitPolicy.from_dict(data)
