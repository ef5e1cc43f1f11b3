"""The monitor's statistics against hand loops, its state files, and its decisions."""

import json
import math
import warnings

import numpy as np
import pytest

from exitguard import calibrate_table
from exitguard.monitor import MonitorFileError, RiskAlarmWarning, RiskMonitor, samples_needed
from exitguard.risk import monitor as stats

EPS, ALPHA = 0.05, 0.05


def loop_reference(x, eps, alpha, window, fraction=0.5, lo=0.0, hi=1.0):
    """Every statistic written out one audit at a time (the definitions, not the algebra)."""
    out = {k: [] for k in ("log_wealth", "log_cusum", "log_sr", "bet", "low", "high")}
    wealth, cusum, sr = 0.0, 0.0, -math.inf
    unit = [(v - lo) / (hi - lo) for v in x]
    lam_sum = lam_x = penalty = 0.0
    sum_x = sq = 0.0
    low, high = 0.0, 1.0
    for t, value in enumerate(x):
        past = x[max(0, t - window) : t]
        m = (sum(past) + eps) / (len(past) + 1)
        v = (sum(p * p for p in past) - len(past) * m * m + (hi - lo) ** 2 / 4) / (len(past) + 1)
        edge = m - eps
        bet = min(max(edge / (max(v, 1e-12) + edge * edge), 0.0), fraction / (eps - lo))
        step = math.log1p(bet * (value - eps))
        wealth += step
        cusum = max(cusum, 0.0) + step
        sr = math.log((math.exp(sr) + 1.0) * math.exp(step))
        # Confidence sequence (Waudby-Smith and Ramdas 2023, Theorem 2).
        n = t + 1
        mean_before = (0.5 + sum_x) / n
        var_before = (0.25 + sq) / n
        lam = min(math.sqrt(2 * math.log(2 / alpha) / (var_before * n * math.log1p(n))), 0.5)
        sum_x += unit[t]
        mean_now = (0.5 + sum_x) / (n + 1)
        sq += (unit[t] - mean_now) ** 2
        lam_sum += lam
        lam_x += lam * unit[t]
        penalty += 4 * (unit[t] - mean_before) ** 2 * (-math.log1p(-lam) - lam) / 4
        centre, width = lam_x / lam_sum, (math.log(2 / alpha) + penalty) / lam_sum
        low, high = max(low, centre - width), min(high, centre + width)
        for key, value_ in (
            ("log_wealth", wealth),
            ("log_cusum", cusum),
            ("log_sr", sr),
            ("bet", bet),
        ):
            out[key].append(value_)
        out["low"].append(lo + (hi - lo) * min(max(low, 0), 1))
        out["high"].append(lo + (hi - lo) * min(max(high, 0), 1))
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize(("lo", "hi"), [(0.0, 1.0), (-1.0, 1.0)])
def test_statistics_equal_the_definitions(rng, lo, hi):
    x = np.where(rng.random(400) < 0.5, 0.0, rng.choice([lo, hi], 400))
    x[200:] = (rng.random(200) < 0.3) * hi  # a change halfway
    settings = stats.BetSettings(window=30)
    got = stats.statistics(
        x, target_risk=EPS, alpha=ALPHA, loss_min=lo, loss_max=hi, settings=settings
    )
    ref = loop_reference(list(x), EPS, ALPHA, 30, lo=lo, hi=hi)
    for key in ("log_wealth", "log_cusum", "log_sr", "bet"):
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-9, atol=1e-9, err_msg=key)
    np.testing.assert_allclose(got["risk_low"], ref["low"], atol=1e-9)
    np.testing.assert_allclose(got["risk_high"], ref["high"], atol=1e-9)


def test_batches_give_the_same_statistics_as_one_pass(rng):
    x = (rng.random(3000) < 0.07).astype(float)
    settings = stats.default_settings(EPS)
    whole = stats.statistics(
        x, target_risk=EPS, alpha=ALPHA, loss_min=0, loss_max=1, settings=settings
    )
    state, parts = None, []
    for chunk in np.array_split(x, 11):
        trajectory, state = stats.update(
            chunk, state, target_risk=EPS, alpha=ALPHA, loss_min=0, loss_max=1, settings=settings
        )
        parts.append(trajectory)
    for key in ("log_wealth", "log_cusum", "log_sr", "risk_low", "risk_high"):
        np.testing.assert_allclose(np.concatenate([p[key] for p in parts]), whole[key], atol=1e-10)


def test_bets_are_predictable(rng):
    """Changing audit t changes no bet before t + 1."""
    x = (rng.random(200) < 0.1).astype(float)
    settings = stats.BetSettings(window=50)
    a = stats.bets(x, target_risk=EPS, loss_min=0, loss_max=1, settings=settings)
    y = x.copy()
    y[120] = 1 - y[120]
    b = stats.bets(y, target_risk=EPS, loss_min=0, loss_max=1, settings=settings)
    np.testing.assert_array_equal(a[:121], b[:121])
    assert not np.array_equal(a[121:], b[121:])


def test_detector_thresholds():
    assert stats.detector_threshold(arl=1e4) == 1e4
    assert stats.detector_threshold(horizon=2000, alpha=0.05) == 40000
    with pytest.raises(ValueError, match="either `arl` or `horizon`"):
        stats.detector_threshold()
    with pytest.raises(ValueError, match="`arl` must be a number > 1"):
        stats.detector_threshold(arl=0.5)


@pytest.mark.parametrize(
    ("procedure", "expected"),
    [
        ("crc", math.ceil(1 / 0.05 - 1)),  # B / (n + 1) <= eps
        ("ucb-hoeffding", math.floor(2 * math.log(10) / 0.05**2) + 1),  # 2B sqrt(log(1/d)/2n) < eps
        ("ucb-hb", math.ceil(math.log(0.1) / math.log(0.95))),  # (1 - eps)^n <= delta
        ("ucb-binomial", math.floor(math.log(0.1) / math.log(0.95)) + 1),  # strict < delta
    ],
)
def test_samples_needed_by_hand(procedure, expected):
    assert samples_needed(target_risk=0.05, delta=0.1, procedure=procedure) == expected


def test_samples_needed_is_the_boundary():
    n = samples_needed(target_risk=0.05, delta=0.1, procedure="ucb-wsr")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert calibrate_table(np.zeros((2, n)), target_risk=0.05, procedure="ucb-wsr").certified
        assert not calibrate_table(
            np.zeros((2, n - 1)), target_risk=0.05, procedure="ucb-wsr"
        ).certified
    with pytest.raises(ValueError, match="no guarantee"):
        samples_needed(target_risk=0.05, delta=0.1, procedure="naive")


@pytest.fixture
def policy():
    rng = np.random.default_rng(1)
    start = rng.integers(1, 60, size=1000)
    table = (np.arange(20)[:, None] >= start[None, :]).astype(float)
    return calibrate_table(
        table,
        target_risk=EPS,
        procedure="ucb-wsr",
        thresholds=np.r_[np.inf, np.linspace(1, 0.05, 19)],
        risk="prediction_consistency",
        seed=0,
    )


def test_monitor_alarms_latches_and_falls_back(policy, rng):
    monitor = RiskMonitor(policy, alpha=ALPHA, arl=1e4)
    good = monitor.update((rng.random(2000) < 0.02).astype(float))
    assert not good.alarm and good.action == "keep the policy"
    assert monitor.active_policy == policy
    with pytest.warns(RiskAlarmWarning, match="Fall back to the full model"):
        bad = monitor.update((rng.random(2000) < 0.25).astype(float))
    assert bad.alarm and bad.alarm_at > 2000 and bad.reason in ("e-process", "change detector")
    assert "fall back to the full model" in bad.action
    fallback = monitor.active_policy
    assert (
        fallback.is_full_model and not fallback.certified and fallback.procedure == policy.procedure
    )
    again = monitor.update(np.zeros(100))
    assert again.alarm and again.alarm_at == bad.alarm_at  # alarms latch
    monitor.reset(policy)
    assert not monitor.alarm and monitor.state.count == 0


def test_state_round_trip_and_tampering(policy, rng, tmp_path):
    monitor = RiskMonitor(policy, alpha=ALPHA)
    x = (rng.random(900) < 0.03).astype(float)
    monitor.update(x[:500])
    path = monitor.save(tmp_path / "state.json")
    resumed = RiskMonitor.load(path, policy=policy)
    a, b = monitor.update(x[500:]), resumed.update(x[500:])
    assert a == b
    data = json.loads(path.read_text())
    data["state"]["log_wealth"] = -50.0  # erase the evidence
    (tmp_path / "tampered.json").write_text(json.dumps(data))
    with pytest.raises(MonitorFileError, match="does not match its `digest`"):
        RiskMonitor.load(tmp_path / "tampered.json", policy=policy)
    other = calibrate_table(np.zeros((3, 300)), target_risk=0.1, procedure="crc")
    with pytest.raises(MonitorFileError, match="belongs to another policy"):
        RiskMonitor.load(path, policy=other)


def test_losses_outside_the_risk_range_are_refused(policy):
    with pytest.raises(ValueError, match=r"`losses` must lie in \[loss_min, loss_max\] = \[0, 1\]"):
        RiskMonitor(policy).update([0.0, -1.0])


def test_cli_replays_a_stream_and_reports_the_alarm(rng, tmp_path, capsys):
    from exitguard import calibrate
    from exitguard.cli import main

    n, n_exits, n_classes = 3000, 3, 4

    def outputs(sharp_first):
        labels = rng.integers(0, n_classes, n)
        logits = rng.normal(size=(n, n_exits, n_classes))
        logits[np.arange(n), :, labels] += np.array([sharp_first, 3.0, 4.0])
        return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)

    calibration = outputs(2.0)
    policy = calibrate(
        calibration, risk="prediction_consistency", target_risk=0.1, procedure="ucb-wsr", seed=0
    )
    assert policy.certified
    policy_path = policy.save(tmp_path / "policy.json")
    good, drifted = outputs(2.0), outputs(0.2)  # the first exit degrades
    stream = tmp_path / "stream.npz"
    np.savez(stream, probs=np.concatenate([good, drifted]), time=np.arange(2 * n))
    state = tmp_path / "state.json"
    argv = ["monitor", str(policy_path), str(stream), "--audit-rate", "0.2", "--json"]
    assert main([*argv, "--state", str(state)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["alarm"] and out["alarm_sample"] >= n  # raised after the drift began
    assert out["audited"] == pytest.approx(0.2 * 2 * n, rel=0.1)
    resumed = RiskMonitor.load(state, policy=policy)
    assert resumed.alarm and resumed.state.count == out["audits"]
    assert main([*argv[:-1], "--audit-rate", "0"]) == 2
    assert "--audit-rate must lie in (0, 1]" in capsys.readouterr().err
    np.savez(stream, probs=good)
    assert main(argv[:-1]) == 0
    assert "no alarm: keep the policy" in capsys.readouterr().out
