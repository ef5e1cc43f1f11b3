"""From saved per-exit outputs to a deployed policy: confidences and predictions, apply, splits."""

import json
import warnings

import numpy as np
import pytest

from exitguard import (
    ExitPolicy,
    build_table,
    build_table_from_predictions,
    calibrate,
    calibrate_predictions,
    calibrate_table,
    evaluate,
)
from exitguard.cli import main
from exitguard.risk.confidence import max_softmax
from exitguard.risk.exits import exit_index
from tests.conftest import sharpening_logits, softmax


@pytest.fixture
def outputs(rng):
    """Per-exit probabilities of 600 samples, 4 exits, 5 classes; exits sharpen with depth."""
    logits, labels = sharpening_logits(rng, 600)
    return softmax(logits), labels


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("risk", ["prediction_gap", "prediction_consistency"])
def test_predictions_give_the_same_table_as_probabilities(outputs, risk):
    probs, labels = outputs
    from_probs = build_table(probs, labels, risk=risk)
    saved = build_table_from_predictions(max_softmax(probs), probs.argmax(-1), labels, risk=risk)
    for key in ("losses", "cost", "thresholds", "exits"):
        np.testing.assert_array_equal(saved[key], from_probs[key])


def test_low_confidences_keep_their_saved_predictions():
    # A stored confidence below 1/C cannot be turned into a distribution whose argmax is the
    # stored class; the saved-outputs path never builds one.
    confidences = np.array([[0.1, 0.9], [0.15, 0.9], [0.9, 0.9]])
    predictions = np.array([[3, 1], [2, 2], [0, 4]])
    table = build_table_from_predictions(
        confidences, predictions, risk="prediction_consistency", thresholds=[np.inf, 0.1]
    )
    # At threshold 0.1 every sample leaves at exit 0: it disagrees with the last exit unless
    # the saved classes agree (sample 1).
    np.testing.assert_array_equal(table["losses"][1], [1.0, 0.0, 1.0])


def test_brier_risks_need_probabilities():
    with pytest.raises(ValueError, match=r"needs per-exit class probabilities.*'prediction_gap'"):
        build_table_from_predictions(np.ones((3, 2)), np.zeros((3, 2)), risk="distribution_gap")


@pytest.mark.parametrize(
    ("confidences", "predictions", "labels", "kwargs", "error", "message"),
    [
        (np.full((3, 2), 1.2), np.zeros((3, 2)), None, {}, ValueError, r"`confidences` must lie"),
        (np.full((3, 2), -0.1), np.zeros((3, 2)), None, {}, ValueError, r"in \[0, 1\]"),
        (np.full((3, 2), np.nan), np.zeros((3, 2)), None, {}, ValueError, "must be finite"),
        (np.ones((3, 2)), -np.ones((3, 2)), None, {}, ValueError, r"`predictions`.*>= 0"),
        (
            np.ones((3, 2)),
            np.full((3, 2), 7),
            None,
            {"n_classes": 5},
            ValueError,
            r"`predictions` must lie in \[0, 4\]",
        ),
        (np.ones((3, 2)), np.full((3, 2), 0.5), None, {}, TypeError, "integer class indices"),
        (np.ones((3, 2)), np.zeros((3, 3)), None, {}, ValueError, "shape of `confidences`"),
        (
            np.ones((3, 2)),
            np.zeros((3, 2)),
            np.array([0, 1, 9]),
            {"n_classes": 5, "risk": "prediction_gap"},
            ValueError,
            r"`labels` must lie in \[0, 4\]",
        ),
        (np.ones((3, 2)), np.zeros((3, 2)), None, {"risk": "prediction_gap"}, ValueError, "labels"),
        (np.ones((3, 2)), np.zeros((3, 2)), None, {"exit_cost": [1, -2]}, ValueError, ">= 0"),
    ],
)
def test_bad_saved_outputs_are_refused(confidences, predictions, labels, kwargs, error, message):
    kwargs.setdefault("risk", "prediction_consistency")
    with pytest.raises(error, match=message):
        build_table_from_predictions(confidences, predictions, labels, **kwargs)


def test_applying_a_policy_to_its_calibration_set_gives_its_own_figures(outputs):
    probs, labels = outputs
    exit_cost = np.array([10.0, 25.0, 45.0, 60.0])
    policy = quiet(
        calibrate,
        probs,
        labels,
        target_risk=0.1,
        procedure="crc",
        exit_cost=exit_cost,
    )
    assert policy.certified and not policy.is_full_model
    applied = policy.apply(probs, labels, exit_cost=exit_cost)
    assert applied.empirical_risk == pytest.approx(policy.empirical_risk)
    assert applied.mean_cost == pytest.approx(policy.expected_cost)
    assert applied.full_cost == 60.0
    np.testing.assert_array_equal(applied.exits, exit_index(max_softmax(probs), policy.threshold))
    np.testing.assert_array_equal(
        applied.predictions, probs.argmax(-1)[np.arange(len(labels)), applied.exits]
    )
    assert applied.exit_counts.sum() == len(labels)
    # The saved-outputs path agrees sample by sample.
    saved = calibrate_predictions(
        max_softmax(probs),
        probs.argmax(-1),
        labels,
        target_risk=0.1,
        procedure="crc",
        exit_cost=exit_cost,
    )
    assert (saved.index, saved.threshold, saved.confidence) == (
        policy.index,
        policy.threshold,
        "provided",
    )
    again = saved.apply(confidences=max_softmax(probs), predictions=probs.argmax(-1), labels=labels)
    np.testing.assert_array_equal(again.exits, applied.exits)
    np.testing.assert_allclose(again.losses, applied.losses)


def test_apply_refuses_outputs_that_do_not_match(outputs):
    probs, labels = outputs
    policy = quiet(calibrate, probs, labels, target_risk=0.1, procedure="crc")
    with pytest.raises(ValueError, match="the outputs have 3 exits but the policy was calibrated"):
        policy.apply(probs[:, 1:] / probs[:, 1:].sum(-1, keepdims=True), labels)
    with pytest.raises(ValueError, match="`confidence` must match the policy's confidence"):
        policy.apply(
            confidences=max_softmax(probs), predictions=probs.argmax(-1), confidence="margin"
        )
    with pytest.raises(ValueError, match="either `exit_probs`"):
        policy.apply()
    tableless = quiet(calibrate_table, np.zeros((3, 10)), target_risk=0.1, procedure="naive")
    with pytest.raises(ValueError, match="without thresholds"):
        tableless.apply(probs, labels)
    # Without labels a gap risk cannot be scored, but exits and costs still are.
    blind = policy.apply(probs)
    assert blind.losses is None and blind.empirical_risk is None


def test_evaluate_takes_user_splits_and_returns_selections(calm):
    losses = calm["losses"][::5]
    rng = np.random.default_rng(3)
    splits = np.stack([rng.choice(2000, 150, replace=False) for _ in range(4)])
    result = evaluate(
        losses,
        procedures=["crc", "ucb-wsr"],
        target_risks=[0.05],
        splits=splits,
        return_selections=True,
        seed=1,
    )
    assert (result.trials, result.n_cal, result.n_test) == (4, 150, 1850)
    for t, (cal, seed) in enumerate(zip(splits, result.order_seeds, strict=True)):
        for name in ("crc", "ucb-wsr"):
            policy = quiet(
                calibrate_table, losses[:, cal], target_risk=0.05, procedure=name, seed=seed
            )
            assert result.selected_rows(name)[t, 0] == policy.index
    again = type(result).from_dict(json.loads(json.dumps(result.to_dict())))
    assert again == result
    with pytest.raises(ValueError, match="must not repeat a sample"):
        evaluate(losses, splits=np.array([[0, 0, 1]]))
    with pytest.raises(ValueError, match=r"indices in \[0, 1999\]"):
        evaluate(losses, splits=np.array([[0, 2000]]))
    with pytest.raises(ValueError, match="no per-split selections"):
        evaluate(losses, trials=2).selected_rows("crc")


# --------------------------------------------------------------------------- command line


@pytest.fixture
def saved_file(outputs, tmp_path):
    probs, labels = outputs
    path = tmp_path / "saved.npz"
    np.savez(
        path,
        confidence=max_softmax(probs),
        prediction=probs.argmax(-1),
        labels=labels,
        exit_cost=np.array([10.0, 25.0, 45.0, 60.0]),
    )
    return path


def test_cli_calibrates_and_applies_saved_outputs(saved_file, outputs, tmp_path, capsys):
    probs, labels = outputs
    policy_path = tmp_path / "policy.json"
    argv = ["calibrate", str(saved_file), "--target-risk", "0.1", "--procedure", "crc"]
    assert main([*argv, "--out", str(policy_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = quiet(
        calibrate_predictions,
        max_softmax(probs),
        probs.argmax(-1),
        labels,
        target_risk=0.1,
        procedure="crc",
        exit_cost=[10.0, 25.0, 45.0, 60.0],
    )
    assert out["index"] == expected.index and out["expected_cost"] == expected.expected_cost
    assert out["n_exits"] == 4 and out["confidence"] == "provided"
    assert main(["apply", str(policy_path), str(saved_file), "--json"]) == 0
    applied = json.loads(capsys.readouterr().out)
    direct = expected.apply(
        confidences=max_softmax(probs),
        predictions=probs.argmax(-1),
        labels=labels,
        exit_cost=[10.0, 25.0, 45.0, 60.0],
    )
    assert applied["empirical_risk"] == pytest.approx(direct.empirical_risk)
    assert applied["mean_cost"] == pytest.approx(direct.mean_cost)
    assert applied["exit_counts"] == direct.exit_counts.tolist()
    assert main(["apply", str(policy_path), str(saved_file)]) == 0
    text = capsys.readouterr().out
    assert "risk            " in text and "below the full model's 60" in text


def test_cli_threshold_grids_and_exit_cost(saved_file, tmp_path, capsys):
    base = ["calibrate", str(saved_file), "--target-risk", "0.1", "--procedure", "crc", "--json"]
    assert main([*base, "--thresholds", "0.9", "0.5", "0.2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["threshold"] in ("never", 0.9, 0.5, 0.2)
    grid_file = tmp_path / "grid.txt"
    grid_file.write_text("0.9\n0.5\n0.2\n")
    assert main([*base, "--thresholds", str(grid_file)]) == 0
    assert json.loads(capsys.readouterr().out)["index"] == out["index"]
    assert main([*base, "--grid-step", "0.25"]) == 0
    assert json.loads(capsys.readouterr().out)["threshold"] in ("never", 1.0, 0.75, 0.5, 0.25, 0.0)
    assert main([*base, "--exit-cost", "1", "2", "3", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["full_cost"] == 4.0


@pytest.mark.parametrize(
    ("content", "argv", "message"),
    [
        ("json", ["--target-risk", "0.1"], "is not an .npz file"),
        ("nolabels", ["--target-risk", "0.1"], "use --risk prediction_consistency"),
        ("saved", ["--target-risk", "0.1", "--risk", "distribution_gap"], "needs per-exit class"),
        ("halfsaved", ["--target-risk", "0.1"], "need both `confidence`"),
        ("saved", ["--target-risk", "0.1", "--thresholds", "2"], "must lie in"),
        (
            "saved",
            ["--target-risk", "0.1", "--thresholds", "0.5", "--grid-step", "0.1"],
            "not both",
        ),
        ("saved", ["--target-risk", "0.1", "--exit-cost", "1", "x"], "--exit-cost: expected"),
        ("saved", ["--target-risk", "0.1", "--exit-cost", "1", "2"], "`exit_cost` must have shape"),
    ],
)
def test_cli_saved_output_errors(content, argv, message, outputs, tmp_path, capsys):
    probs, labels = outputs
    path = tmp_path / "in.npz"
    if content == "json":
        path.write_text('{"losses": [[0, 0]]}')
    elif content == "nolabels":
        np.savez(path, confidence=max_softmax(probs), prediction=probs.argmax(-1))
    elif content == "halfsaved":
        np.savez(path, confidence=max_softmax(probs), labels=labels)
    else:
        np.savez(path, confidence=max_softmax(probs), prediction=probs.argmax(-1), labels=labels)
    assert main(["calibrate", str(path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_cli_evaluate_with_user_splits(calm, tmp_path, capsys):
    table = tmp_path / "table.npz"
    np.savez(table, losses=calm["losses"][::5], cost=calm["cost"][::5])
    splits = np.stack([np.random.default_rng(s).choice(2000, 120, replace=False) for s in range(3)])
    np.save(tmp_path / "splits.npy", splits)
    argv = ["evaluate", str(table), "--procedure", "ucb-wsr", "--target-risk", "0.05"]
    assert main([*argv, "--splits", str(tmp_path / "splits.npy"), "--per-split", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    direct = evaluate(
        calm["losses"][::5],
        procedures=["ucb-wsr"],
        target_risks=[0.05],
        cost=calm["cost"][::5],
        splits=splits,
        return_selections=True,
        seed=0,
    )
    assert out["selections"]["ucb-wsr"] == [list(r) for r in direct.selections["ucb-wsr"]]
    assert out["results"][0]["mean_test_risk"] == pytest.approx(direct.rows[0].mean_test_risk)


def test_policy_json_records_the_reading_order(outputs, tmp_path):
    probs, labels = outputs
    policy = quiet(calibrate, probs, labels, target_risk=0.1, procedure="ucb-wsr", seed=42)
    assert (policy.sample_order, policy.order_seed) == ("random", 42)
    assert ExitPolicy.from_dict(json.loads(policy.to_json())) == policy
    fresh = quiet(calibrate, probs, labels, target_risk=0.1, procedure="ucb-wsr")
    assert isinstance(fresh.order_seed, int) and 0 <= fresh.order_seed < 2**53
    repeat = quiet(
        calibrate, probs, labels, target_risk=0.1, procedure="ucb-wsr", seed=fresh.order_seed
    )
    assert repeat.index == fresh.index
    given = quiet(calibrate, probs, labels, target_risk=0.1, procedure="ucb-wsr", order="given")
    assert (given.sample_order, given.order_seed) == ("given", None)
    crc = quiet(calibrate, probs, labels, target_risk=0.1, procedure="crc")
    assert (crc.sample_order, crc.order_seed) == (None, None)  # CRC reads only row means
