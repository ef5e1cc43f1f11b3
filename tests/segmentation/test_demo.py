"""The segmentation demo end to end on a tiny configuration (digits scenes)."""

import dataclasses
import json
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from exitguard.report import rebuild_report
from exitguard.tasks.segmentation import (
    RISK_TITLES,
    SEGMENTATION_RISKS,
    DemoConfig,
    prepare,
    run_demo,
)
from tests.report_checks import check_demo_report, earlier_report


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("segmentation")
    earlier_report(folder / "report")
    config = DemoConfig(
        out=str(folder / "report"),
        cache_dir=str(folder / "cache"),
        n_train=96,
        n_heldout=120,
        epochs=1,
        n_cal=60,
        trials=4,
        target_risks=(0.01, 0.05, 0.1),
        quick=True,
        progress=False,
        timing_repeats=1,
    )
    return config, run_demo(config, log=lambda line: None)


def test_report_and_results(demo):
    config, results = demo
    folder = Path(config.out)
    files = [f"table_{risk}.npz" for risk in SEGMENTATION_RISKS] + ["policy.json"]
    page = check_demo_report(folder, results, data_files=files)
    assert list(results.risks) == list(SEGMENTATION_RISKS)
    assert results.task == "segmentation"
    for risk in SEGMENTATION_RISKS:  # risks in words, not symbols
        assert f"<h3>{RISK_TITLES[risk]} (B = " in page
    assert "R^C" not in page and "background" in page
    table, five_risks, vectors = results.tables
    assert len(table.rows) == 9 and len(table.header) == 1 + 3 * 3
    assert len(five_risks.rows) == len(SEGMENTATION_RISKS)
    assert "per-exit" in vectors.title  # Pareto Testing beside the single threshold
    assert [row[0] for row in vectors.rows] == ["single UCB-WSR", "pareto WSR 1/4"]
    assert "Per-exit thresholds" in results.summary[-2] and "per-exit" in page
    (figure,) = results.figures
    assert figure.file == "segmentation_examples.png" and len(figure.columns) == 5
    assert all(len(row.cells) == 5 for row in figure.rows)
    assert figure.legend[0].label == "background"
    assert len(figure.legend) == 11 and figure.colorbar
    rebuilt = rebuild_report(folder / "results.json", out=folder / "again")
    assert json.loads((folder / "again" / "results.json").read_text()) == results.to_dict()
    assert rebuilt.is_file()


def test_real_exits_and_guarantee_fields(demo):
    _, results = demo
    measures = dict(results.timed.measures)
    assert measures["real exits equal simulated exits"] is True
    assert results.policy["confidence"] == "max_softmax/mean"
    assert results.policy["n_exits"] == 4
    for risk in SEGMENTATION_RISKS:
        rows = results.risks[risk].evaluation.rows
        assert {r.procedure for r in rows} == {"naive", "crc", "ucb-wsr", "ltt"}
        assert all(r.mean_test_risk is not None for r in rows)


def test_second_run_loads_the_cached_model(demo):
    config, first = demo
    again = prepare(dataclasses.replace(config, trials=2), log=lambda line: None)
    assert again.trained.from_cache is True and first.model.from_cache is False
    assert again.network.fingerprint == first.model.fingerprint


def test_the_table_procedure_is_required():
    with pytest.raises(ValueError, match="`procedures` must include 'ucb-wsr'"):
        DemoConfig(procedures=("crc",))
