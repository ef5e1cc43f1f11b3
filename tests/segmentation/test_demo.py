"""The segmentation demo end to end on a tiny configuration (digits scenes)."""

import dataclasses
import json
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from exitguard.report import rebuild_report
from exitguard.tasks.segmentation import SEGMENTATION_RISKS, DemoConfig, run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("segmentation")
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
    for name in ("index.html", "results.json", "segmentation_examples.png", "efficiency.png"):
        assert (folder / name).stat().st_size > 0, name
    assert list(results["risks"]) == list(SEGMENTATION_RISKS)
    assert results["task"] == "segmentation"
    page = (folder / "index.html").read_text()
    assert "miscoverage" in page and "segmentation_examples.png" in page
    table, four_risks, vectors = results["tables"]
    assert len(table["rows"]) == 9 and len(table["header"]) == 1 + 3 * 3
    assert len(four_risks["rows"]) == 4
    assert [row[0] for row in vectors["rows"]] == ["single UCB-WSR", "pareto WSR 1/4"]
    assert "Per-exit thresholds" in results["summary"][-1] and "per-exit" in page
    figure = results["figures"][0]
    assert len(figure["columns"]) == 5 and all(len(r["cells"]) == 5 for r in figure["rows"])
    rebuilt = rebuild_report(folder / "results.json", out=folder / "again")
    assert json.loads((folder / "again" / "results.json").read_text()) == results
    assert rebuilt.is_file()


def test_real_exits_and_guarantee_fields(demo):
    _, results = demo
    timing = results["timing"]
    assert timing["real exits equal simulated exits"] is True
    assert results["policy"]["confidence"] == "max_softmax/mean"
    assert results["policy"]["n_exits"] == 4
    for risk in SEGMENTATION_RISKS:
        rows = results["risks"][risk]["evaluation"]["rows"]
        assert {r["procedure"] for r in rows} == {"naive", "crc", "ucb-wsr", "ltt"}
        assert all(r["mean_test_risk"] is not None for r in rows)


def test_second_run_loads_the_cached_model(demo):
    config, first = demo
    again = run_demo(dataclasses.replace(config, trials=2), log=lambda line: None)
    assert again["model"]["from_cache"] is True and first["model"]["from_cache"] is False
    assert again["model"]["fingerprint"] == first["model"]["fingerprint"]


def test_the_table_procedure_is_required():
    with pytest.raises(ValueError, match="`procedures` must include 'ucb-wsr'"):
        DemoConfig(procedures=("crc",))
