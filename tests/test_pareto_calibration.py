"""calibrate_pareto and `exitguard calibrate --risk A:eps --risk B>t:eps [--pareto]`."""

from __future__ import annotations

import functools
import json
import warnings

import numpy as np
import pytest

import exitguard
from exitguard.cli import main
from exitguard.pareto_calibration import RiskTarget, calibrate_pareto, split_risk_target
from exitguard.policy import ExitPolicy
from exitguard.risk.configurations import ThresholdFamily, evaluate_vectors
from exitguard.risk.losses import get_risk, per_exit_losses
from exitguard.risk.pareto import VectorSearch

SEARCH = VectorSearch(levels=12, restarts=0, multipliers=6, scalar_levels=40)


def outputs(n: int, seed: int, n_exits: int = 4, classes: int = 5):
    """Per-exit probabilities that grow more accurate and confident exit by exit; labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(classes, size=n)
    hardness = rng.random(n)[:, None]  # (n, 1) easy samples are right early
    strength = np.linspace(1.0, 4.0, n_exits)[None, :] * (1.2 - hardness)  # (n, L)
    logits = rng.normal(size=(n, n_exits, classes))
    logits[np.arange(n), :, labels] += strength
    probs = np.exp(logits)
    return probs / probs.sum(-1, keepdims=True), labels


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("procedure", ["ucb-wsr", "ltt"])
def test_one_mean_risk_on_the_scalar_grid_is_calibrate(procedure):
    probs, labels = outputs(800, 1)
    expected = quiet(
        exitguard.calibrate,
        probs,
        labels,
        risk="prediction_gap",
        target_risk=0.05,
        procedure=procedure,
        seed=5,
    )
    policy = quiet(
        calibrate_pareto,
        probs,
        labels,
        risks=["prediction_gap:0.05"],
        space="scalar",
        procedure=procedure,
        seed=5,
    )
    assert policy.kind == "scalar" and policy.risks == () and policy.pareto is None
    assert expected.certified and policy.certified
    for field in ("threshold", "index", "certified", "upper_bound", "guarantee", "order_seed"):
        assert getattr(policy, field) == getattr(expected, field), field
    assert policy.empirical_risk == pytest.approx(expected.empirical_risk, abs=1e-15)


def test_vectors_cost_what_they_claim_and_round_trip():
    probs, labels = outputs(1200, 2)
    calibrate_once = functools.partial(
        quiet,
        calibrate_pareto,
        probs,
        labels,
        risks=["prediction_consistency:0.05", "prediction_gap:0.03"],
        search=SEARCH,
        exit_cost=[1.0, 2.0, 3.0, 4.0],
        seed=9,
    )
    policy = calibrate_once()
    assert policy.kind == "vector" and policy.certified and policy.pareto == "split"
    assert policy.n == 1200 and policy.n_opt == 300 and len(policy.risks) == 2
    assert [r.risk for r in policy.risks] == ["prediction_consistency", "prediction_gap"]
    assert all(r.upper_bound < r.target_risk for r in policy.risks)
    # The expected cost is the vector's mean cost on all calibration samples.
    per_exit = per_exit_losses(probs, labels, get_risk("prediction_gap"))
    table = evaluate_vectors(
        probs.max(-1), per_exit, np.array([policy.thresholds]), exit_cost=[1, 2, 3, 4]
    )
    assert policy.expected_cost == pytest.approx(table.cost.mean())
    assert policy.relative_saving > 0.1
    assert calibrate_once() == policy  # a seed repeats the calibration
    assert ExitPolicy.from_dict(json.loads(policy.to_json())) == policy


def test_tail_risk_and_external_optimisation_set():
    probs, _ = outputs(1000, 3)
    extra, _ = outputs(500, 4)
    policy = quiet(
        calibrate_pareto,
        probs,
        risks=["distribution_consistency>0.5:0.05", "prediction_consistency:0.1"],
        search=SEARCH,
        opt_exit_probs=extra,
        procedure="ltt",
        seed=2,
        rng=0,
    )
    assert policy.pareto == "external" and policy.n == 1000 and policy.n_opt == 500
    tail = policy.risks[0]
    assert tail.tolerance == 0.5 and tail.loss_bound == 1.0
    assert policy.certified and all(r.p_value <= 0.1 for r in policy.risks)
    assert "P(distribution_consistency > 0.5) <= 0.05" in policy.guarantee
    family = quiet(
        calibrate_pareto,
        probs,
        risks=["prediction_consistency:0.1"],
        space=ThresholdFamily("scaled", 1.0),
        seed=2,
    )
    assert family.kind == "function" and family.threshold_function == ThresholdFamily("scaled", 1.0)


def test_risk_targets_parse_and_refuse():
    assert split_risk_target(" prediction_gap > 0.1 : 0.05 ") == ("prediction_gap", 0.1, 0.05)
    assert RiskTarget.parse("prediction_gap", target_risk=0.2).target_risk == 0.2
    with pytest.raises(ValueError, match="names no epsilon"):
        RiskTarget.parse("prediction_gap")
    with pytest.raises(ValueError, match=r"`risk` must be one of"):
        RiskTarget.parse("accuracy:0.1")
    with pytest.raises(ValueError, match="must read NAME"):
        split_risk_target("prediction gap:0.1")
    with pytest.raises(ValueError, match=r"`target_risk` must be a float in \(0, 1\)"):
        RiskTarget("prediction_gap", 1.5)
    probs, labels = outputs(100, 5)
    with pytest.raises(ValueError, match="compares with the labels"):
        calibrate_pareto(probs, risks=["prediction_gap:0.1"])
    with pytest.raises(ValueError, match="must not repeat a risk"):
        calibrate_pareto(probs, labels, risks=["prediction_gap:0.1", "prediction_gap:0.2"])
    with pytest.raises(ValueError, match="`space` must be"):
        calibrate_pareto(probs, labels, risks=["prediction_gap:0.1"], space="grid")
    with pytest.raises(ValueError, match="fixed-sequence p-value procedure"):
        calibrate_pareto(probs, labels, risks=["prediction_gap:0.1"], procedure="crc")
    with pytest.raises(ValueError, match="needs probabilities"):
        calibrate_pareto(
            confidences=probs.max(-1),
            predictions=probs.argmax(-1),
            risks=["distribution_gap:0.1"],
            labels=labels,
        )


# ------------------------------------------------------------------------------ the CLI


@pytest.fixture
def outputs_file(tmp_path):
    probs, labels = outputs(1000, 6)
    path = tmp_path / "outputs.npz"
    np.savez(path, probs=probs, labels=labels)
    return str(path), probs, labels


def test_cli_two_risks_with_pareto_equals_the_library(outputs_file, tmp_path, capsys):
    path, probs, labels = outputs_file
    out = tmp_path / "policy.json"
    argv = [
        "calibrate",
        path,
        "--risk",
        "prediction_consistency:0.05",
        "--risk",
        "distribution_consistency>0.4:0.05",
        "--pareto",
        "--order-seed",
        "3",
        "--out",
        str(out),
        "--json",
    ]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    printed.pop("warnings")
    expected = quiet(
        calibrate_pareto,
        probs,
        labels,
        risks=["prediction_consistency:0.05", "distribution_consistency>0.4:0.05"],
        seed=3,
        rng=0,
    ).with_model(n_exits=4)
    assert printed == expected.to_dict()
    assert ExitPolicy.load(out) == expected
    assert main(["apply", str(out), path, "--json"]) == 0
    applied = json.loads(capsys.readouterr().out)
    assert applied["relative_saving"] == pytest.approx(expected.relative_saving)


def test_cli_several_risks_on_the_grid_and_errors(outputs_file, tmp_path, capsys):
    path, _, _ = outputs_file
    assert main(["calibrate", path, "--risk", "prediction_consistency:0.05",
                 "--risk", "prediction_gap:0.03", "--order-seed", "1"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "R[prediction_consistency]" in text and "R[prediction_gap]" in text
    assert "fixed-sequence testing along the grid" in text
    assert main(["calibrate", path, "--risk", "prediction_gap"]) == 2
    assert "names no epsilon" in capsys.readouterr().err
    table = tmp_path / "table.npz"
    np.savez(table, losses=np.zeros((3, 10)))
    assert main(["calibrate", str(table), "--target-risk", "0.1", "--pareto"]) == 2
    assert "not a loss table" in capsys.readouterr().err
    assert main(["evaluate", path, "--risk", "prediction_gap>0.1:0.1"]) == 2
    assert "takes one --risk NAME" in capsys.readouterr().err
