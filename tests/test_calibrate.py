import json
import math
import warnings

import numpy as np
import pytest

import exitguard
from exitguard import (
    ExitPolicy,
    NonMonotoneRiskWarning,
    calibrate,
    calibrate_table,
    load_policy,
)
from tests.conftest import sharpening_logits, softmax


@pytest.fixture
def table(rng):
    start = rng.integers(1, 40, size=400)
    return (np.arange(20)[:, None] >= start[None, :]).astype(float)


def test_import_needs_no_torch():
    import subprocess
    import sys

    code = (
        "import sys, exitguard, exitguard.cli, exitguard.evaluation; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_policy_fields(table):
    grid = np.r_[np.inf, np.linspace(1, 0.05, 19)]
    policy = calibrate_table(
        table,
        target_risk=0.1,
        delta=0.1,
        procedure="ucb-wsr",
        cost=np.arange(20.0, 0, -1),
        thresholds=grid,
    )
    assert policy.certified and policy.index > 0
    assert policy.threshold == grid[policy.index]
    assert policy.empirical_risk == pytest.approx(table[policy.index].mean())
    assert policy.upper_bound < 0.1
    assert policy.expected_cost == 20.0 - policy.index
    assert policy.full_cost == 20.0
    assert "P(R <= 0.1) >= 0.9" in policy.guarantee
    assert policy.n == 400 and policy.procedure == "ucb-wsr"
    assert "ExitPolicy(threshold=" in repr(policy)


def test_json_round_trip(table, tmp_path):
    policy = calibrate_table(
        table, target_risk=0.1, procedure="crc", thresholds=np.linspace(1, 0, 20)
    )
    again = ExitPolicy.from_dict(json.loads(policy.to_json()))
    assert again == policy
    path = policy.save(tmp_path / "policy.json")
    assert load_policy(path) == policy
    full = calibrate_table(np.zeros((2, 10)), target_risk=0.5, procedure="naive")
    assert ExitPolicy.from_dict(json.loads(full.to_json())) == full


def test_fingerprint_tracks_the_data(table):
    a = calibrate_table(table, target_risk=0.1, procedure="crc")
    changed = table.copy()
    changed[5, 0] = 1 - changed[5, 0]
    b = calibrate_table(changed, target_risk=0.1, procedure="crc")
    assert a.data_fingerprint != b.data_fingerprint and len(a.data_fingerprint) == 16


def test_save_keeps_the_old_file_when_writing_fails(table, tmp_path, monkeypatch):
    path = tmp_path / "policy.json"
    path.write_text("old")
    policy = calibrate_table(table, target_risk=0.1, procedure="crc")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("exitguard._files.os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        policy.save(path)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.json"]  # no temporary left


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"losses": [[0, 0], [np.nan, 0]]}, ValueError, "`losses` must be finite; got 1 NaN"),
        ({"losses": [[0, 0], [np.inf, 0]]}, ValueError, "`losses` must be finite"),
        ({"losses": [0, 0, 1]}, ValueError, "`losses` must be 2-D; got shape"),
        ({"losses": [[0], [1]]}, ValueError, "at least 2 calibration samples"),
        (
            {"losses": [[0, 0], [1.5, 0]]},
            ValueError,
            r"must lie in \[-loss_bound, loss_bound\] = \[-1, 1\]",
        ),
        ({"losses": [[0.1, 0], [0.5, 0]]}, ValueError, "row 0 must be loss-free"),
        ({"target_risk": 0.0}, ValueError, r"`target_risk` must be a float in \(0, 1\); got 0.0"),
        ({"target_risk": 1.5}, ValueError, r"`target_risk` must be a float in \(0, 1\); got 1.5"),
        (
            {"target_risk": "0.1"},
            TypeError,
            r"`target_risk` must be a float in \(0, 1\); got '0.1'",
        ),
        ({"delta": 1.0}, ValueError, r"`delta` must be a float in \(0, 1\); got 1.0"),
        ({"procedure": "magic"}, ValueError, "`procedure` must be one of"),
        ({"cost": [1, 2, 3]}, ValueError, r"`cost` must have shape \(2,\) or \(2, 3\)"),
        ({"thresholds": [0.5, 0.9]}, ValueError, "`thresholds` must be strictly decreasing"),
        ({"loss_bound": -1}, ValueError, "`loss_bound` must be a positive finite float"),
    ],
)
def test_bad_input(kwargs, error, message):
    arguments = {"losses": [[0, 0, 0], [0, 1, 0]], "target_risk": 0.1, "procedure": "crc"}
    arguments.update(kwargs)
    losses = arguments.pop("losses")
    with pytest.raises(error, match=message):
        calibrate_table(losses, **arguments)


def test_far_from_monotone_risk_warns_and_points_to_monotone_free_procedures(rng):
    table = np.zeros((4, 500))
    table[1] = rng.random(500) < 0.3
    table[2] = rng.random(500) < 0.02  # risk collapses after row 1
    table[3] = rng.random(500) < 0.3
    with pytest.warns(NonMonotoneRiskWarning, match="procedure='crc'.*procedure='ltt'") as caught:
        marginal = calibrate_table(table, target_risk=0.1, procedure="crc-marginal")
    assert marginal.index == 2  # the paper's CRC jumps over the failing row 1
    assert "row 2 was selected although 1 earlier row(s) fail" in str(caught[0].message)
    # Monotonised CRC needs no assumption: row 2's losses become max(row 1, row 2).
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonMonotoneRiskWarning)
        warnings.simplefilter("ignore", exitguard.RiskNotControlledWarning)
        assert calibrate_table(table, target_risk=0.1, procedure="crc").index == 0
        monotone = np.sort(table, axis=0)
        calibrate_table(monotone, target_risk=0.1, procedure="crc-marginal")


def test_monotonicity_check_finds_a_small_dip_across_many_rows(rng):
    """A dip of 0.8 points lasting 20 rows of nested 0-1 losses is found at n = 4000."""
    from exitguard.calibration import monotonicity_check

    n = 4000
    start = rng.integers(1, 2000, size=n)  # sample i fails from row start[i] on (monotone)
    table = (np.arange(40)[:, None] >= start[None, :]).astype(float)
    assert monotonicity_check(table).p_value > 0.5  # nested losses: monotone, not flagged
    dipped = table.copy()
    recover = rng.choice(n, 32, replace=False)  # 0.8% fail at rows 1..14, recover at 15..34
    dipped[1:15, recover] = 1.0
    dipped[15:35, recover] = 0.0
    check = monotonicity_check(dipped)
    assert check.p_value <= 0.01
    assert check.earlier < 15 <= check.later < 35
    assert check.drop > 0
    assert monotonicity_check(np.maximum.accumulate(dipped, axis=0)).p_value > 0.5


def test_calm_table_warns_only_where_the_paper_crc_relies_on_monotonicity(calm):
    # On all 2000 articles the dips of CALM's risk curve are within noise and the paper's CRC
    # selection does not jump over failing rows; on 100-sample splits it often does.
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonMonotoneRiskWarning)
        calibrate_table(calm["losses"], target_risk=0.05, procedure="crc-marginal")
        calibrate_table(calm["losses"], target_risk=0.05, procedure="crc")
    split = np.random.default_rng(0).choice(2000, 100, replace=False)
    warned = 0
    for eps in (0.03, 0.05, 0.08, 0.1):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            calibrate_table(calm["losses"][:, split], target_risk=eps, procedure="crc-marginal")
        warned += any(w.category is NonMonotoneRiskWarning for w in caught)
    assert warned >= 1


def test_calibrate_from_per_exit_outputs(rng):
    n_exits = 4
    logits, labels = sharpening_logits(rng, 500, n_exits)
    probs = softmax(logits)
    policy = calibrate(probs, labels, risk="prediction_gap", target_risk=0.1, procedure="crc")
    assert policy.n_exits == n_exits and policy.risk == "prediction_gap"
    assert policy.confidence == "max_softmax" and policy.loss_bound == 1.0
    assert policy.expected_cost <= n_exits
    brier = calibrate(logits, labels, risk="distribution_gap", target_risk=0.1, from_logits=True)
    assert brier.loss_bound == 2.0


def test_calibrate_rejects_probabilities_off_the_simplex(rng):
    with pytest.raises(ValueError, match="must sum to 1 over classes"):
        calibrate(rng.random((10, 3, 4)), rng.integers(0, 4, 10), target_risk=0.1)
    with pytest.raises(ValueError, match=r"`exit_probs` must be 3-D"):
        calibrate(rng.random((10, 4)), target_risk=0.1)


def test_public_api():
    for name in exitguard.__all__:
        assert hasattr(exitguard, name)
    # Without thresholds the policy is identified by its row; row 0 is the full model.
    policy = calibrate_table([[0, 0], [0, 0]], target_risk=0.5, procedure="naive")
    assert policy.index == 1 and policy.threshold is None
    full = calibrate_table([[0, 0], [1, 1]], target_risk=0.5, procedure="naive")
    assert full.is_full_model and math.isinf(full.threshold)
