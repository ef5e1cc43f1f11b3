"""The classification main job on a tiny configuration (seconds)."""

import json

import numpy as np
import pytest
from scipy import stats

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from exitguard.data.images import load_digits
from exitguard.tasks.classification import (
    CNNConfig,
    DemoConfig,
    TrainSettings,
    build_classifier,
    load_or_train,
    run_demo,
)

FILES = (
    "index.html",
    "results.json",
    "test_risk.png",
    "violations.png",
    "efficiency.png",
    "exit_histogram.png",
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    config = DemoConfig(
        out=str(root / "report"),
        cache_dir=str(root / "cache"),
        epochs=2,
        timing_repeats=1,
        progress=False,
        quick=True,
    )
    logs: list[str] = []
    results = run_demo(config, log=logs.append)
    return root, results, logs


def test_report_files_are_written(demo):
    root, results, _ = demo
    for name in FILES:
        assert (root / "report" / name).stat().st_size > 0, name
    assert json.loads((root / "report" / "results.json").read_text()) == json.loads(
        json.dumps(results)
    )


def test_ucb_violation_rates_are_consistent_with_delta(demo):
    _, results, _ = demo
    trials = results["settings"]["trials"]
    assert trials >= 100
    for risk, data in results["risks"].items():
        for row in data["evaluation"]["rows"]:
            if row["procedure"] in ("ucb-wsr", "ltt"):
                violations = round(row["population_violation_rate"] * trials)
                p = stats.binomtest(violations, trials, 0.1, alternative="greater").pvalue
                assert p > 1e-3, (risk, row)


def test_real_inference_matches_the_simulation(demo):
    _, results, _ = demo
    timing = results["timing"]
    assert timing["real exits equal simulated exits"] is True
    assert timing["measured speed-up, batch 256"] > 0
    assert sum(results["exit_histogram"]["counts"]) == timing["test images"]
    model = results["model"]
    assert model["n_exits"] == 5 and np.all(np.diff(model["flops_per_exit"]) > 0)


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
    (vectors,) = results["tables"]
    assert [row[0] for row in vectors["rows"]] == ["single UCB-WSR", "pareto WSR 1/4"]
    assert results["summary"][-1].startswith("Per-exit thresholds (Pareto Testing")
    assert "per-exit thresholds (Pareto Testing)" in (root / "report" / "index.html").read_text()
