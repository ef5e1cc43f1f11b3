"""The classification main job on a tiny configuration (seconds)."""

import numpy as np
import pytest
from scipy import stats

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from exitguard import ExitPolicy, calibrate, evaluate
from exitguard.data.images import load_digits
from exitguard.tasks.classification import (
    CNNConfig,
    TrainSettings,
    build_classifier,
    load_or_train,
)
from tests.report_checks import REPORT_FILES, check_demo_report

DATA_FILES = (
    "table_prediction_gap.npz",
    "table_prediction_consistency.npz",
    "table_distribution_gap.npz",
    "table_distribution_consistency.npz",
    "exits_calibration.npz",
    "exits_test.npz",
    "policy.json",
)


@pytest.fixture(scope="module")
def demo(classification_demo):
    return classification_demo


def test_report_files_are_written(demo):
    root, results, _ = demo
    for name in REPORT_FILES:
        assert (root / "report" / name).stat().st_size > 0, name
    check_demo_report(root / "report", results, data_files=DATA_FILES)


def test_saved_tables_and_outputs_calibrate_as_the_demo_did(demo):
    """The files beside the report give the demo's own numbers through the public API."""
    root, results, _ = demo
    with np.load(root / "report" / "table_prediction_gap.npz", allow_pickle=False) as table:
        assert table["losses"].shape == table["cost"].shape == table["exits"].shape
        assert str(table["risk"]) == "prediction_gap" and float(table["loss_bound"]) == 1.0
        assert table["exits"].min() == 0 and table["exits"].max() == results.model.n_exits - 1
        again = evaluate(
            table["losses"],
            procedures=["ucb-wsr"],
            target_risks=[0.05],
            n_cal=results.settings.n_cal,
            trials=results.settings.trials,
            cost=table["cost"],
            seed=results.settings.seed,
        )
    row = results.risks["prediction_gap"].evaluation.row("ucb-wsr", 0.05)
    assert again.row("ucb-wsr", 0.05).mean_test_risk == row.mean_test_risk
    policy = ExitPolicy.load(root / "report" / "policy.json")
    assert policy.to_dict() == dict(results.policy)
    with np.load(root / "report" / "exits_calibration.npz", allow_pickle=False) as outputs:
        again = calibrate(
            outputs["probs"],
            outputs["labels"],
            risk=policy.risk,
            target_risk=policy.target_risk,
            delta=policy.delta,
            procedure=policy.procedure,
            exit_cost=outputs["exit_cost"],
            rng=results.settings.seed,
            seed=policy.order_seed,
        )
    assert again.threshold == policy.threshold


def test_ucb_violation_rates_are_consistent_with_delta(demo):
    _, results, _ = demo
    trials = results.settings.trials
    assert trials >= 100
    for risk, data in results.risks.items():
        for row in data.evaluation.rows:
            if row.procedure in ("ucb-wsr", "ltt"):
                violations = round(row.population_violation_rate * trials)
                p = stats.binomtest(violations, trials, 0.1, alternative="greater").pvalue
                assert p > 1e-3, (risk, row)


def test_real_inference_matches_the_simulation(demo):
    _, results, _ = demo
    timed = results.timed
    assert dict(timed.measures)["real exits equal simulated exits"] is True
    assert {s.batch_size for s in timed.speeds} == {1, 256}
    assert all(s.speedup > 0 for s in timed.speeds)
    assert sum(timed.exit_counts) == timed.n_test == 898 - timed.n_cal
    model = results.model
    assert model.n_exits == 5 and np.all(np.diff(model.flops_per_exit) > 0)


def test_corrupted_cache_is_detected_and_rebuilt(tmp_path):
    data = load_digits().subset(np.arange(200))
    settings = TrainSettings(epochs=1)
    model = CNNConfig(widths=(8, 8), strides=(1, 2))
    first = load_or_train(
        data, model_config=model, settings=settings, cache_dir=tmp_path, progress=False
    )
    assert not first.from_cache
    again = load_or_train(
        data, model_config=model, settings=settings, cache_dir=tmp_path, progress=False
    )
    assert again.from_cache
    weights = next(tmp_path.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-10] + b"corrupted!")
    logs: list[str] = []
    rebuilt = load_or_train(
        data,
        model_config=model,
        settings=settings,
        cache_dir=tmp_path,
        progress=False,
        log=logs.append,
    )
    assert not rebuilt.from_cache and "unusable" in logs[0]
    reference = build_classifier(model, image_shape=(1, 8, 8))
    assert rebuilt.module.fingerprint == reference.fingerprint
    for key, value in first.module.state_dict().items():  # seeded: the same weights again
        assert np.array_equal(value.numpy(), rebuilt.module.state_dict()[key].numpy()), key


def test_report_shows_per_exit_thresholds_beside_the_single_threshold(demo):
    root, results, _ = demo
    (vectors,) = results.tables
    assert [row[0] for row in vectors.rows] == ["single UCB-WSR", "pareto WSR 1/4"]
    assert results.summary[-1].startswith("Per-exit thresholds (Pareto Testing")
    assert "per-exit thresholds (Pareto Testing)" in (root / "report" / "index.html").read_text()
