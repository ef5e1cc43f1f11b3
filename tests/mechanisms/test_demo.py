"""The mechanisms demo end to end on digits, with one-epoch models (a smoke run)."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from exitguard.tasks.mechanisms.demo import MECHANISMS, DemoConfig, run_demo
from exitguard.tasks.mechanisms.report import (
    FIGURES,
    plot_anytime,
    plot_saving_vs_target,
    plot_tradeoff,
)
from tests.mechanisms.conftest import one_thread


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mechanisms")
    config = DemoConfig(
        out=str(folder / "report"),
        cache_dir=str(folder / "cache"),
        quick=True,
        epochs=1,
        trials=20,
        n_cal=100,
        target_risks=(0.05, 0.1, 0.2),
        timing_repeats=1,
        timing_batch1=8,
        skip_grid=8,
        progress=False,
    )
    with one_thread():
        yield run_demo(config, log=lambda line: None), folder / "report"


def test_report_files_are_written_and_the_json_is_strict(demo):
    results, folder = demo
    for name in ("index.html", "results.json", *FIGURES):
        assert (folder / name).stat().st_size > 0, name
    saved = json.loads((folder / "results.json").read_text())
    assert saved["comparison"] == json.loads(json.dumps(results["comparison"]))
    page = (folder / "index.html").read_text()
    for mechanism in MECHANISMS:
        assert mechanism in page


def test_every_mechanism_is_compared_on_both_risks(demo):
    results, _ = demo
    rows = results["comparison"]
    assert {(r["mechanism"], r["risk"]) for r in rows} == {
        (m, r) for m in MECHANISMS for r in ("prediction_gap", "prediction_consistency")
    }
    eps = results["settings"]["target_risk"]
    for row in rows:
        assert row["real_equals_simulated"], row["mechanism"]
        assert row["speedup_batch_1"] > 0 and row["speedup_batch_256"] > 0
        if row["certified"] and row["certified_risk"] is not None:
            assert row["certified_risk"] <= eps
        if not row["certified"]:  # the full model
            assert row["flops_saved"] == 0.0
        assert math.isfinite(row["test_risk"])


def test_row_zero_of_every_table_is_the_full_model(demo):
    results, _ = demo
    for name, tradeoff in results["tradeoffs"].items():
        assert tradeoff["flops_fraction"][0] == 1.0, name
        for risk in results["settings"]["risks"]:
            assert tradeoff["risk"][risk][0] == 0.0, (name, risk)
    flops = results["models"]["flops"]
    full = {r["mechanism"]: r["full_flops"] for r in results["comparison"]}
    assert full["branch exits"] == flops["branch exits"]["full"]
    assert full["cascade"] == flops["cascade"]["full"] == flops["cascade"]["model"][-1]
    assert full["learned halting"] == flops["learned halting"]["full"]
    assert full["anytime"] == flops["anytime budgets"][-1]
    assert full["layer skipping"] == flops["layer skipping"]["full"]


def test_anytime_curve_bounds_its_calibration_risk(demo):
    results, _ = demo
    for curve in results["anytime_curves"].values():
        assert all(
            u >= m for u, m in zip(curve["upper_bound"], curve["empirical_risk"], strict=True)
        )
        assert curve["smallest_certified_budget"] in curve["budget"]


def test_plots_draw_what_the_results_hold(demo):
    from exitguard.report.plots import _pyplot

    results, _ = demo
    plt = _pyplot()
    figure, axes = plt.subplots(1, 3)
    try:
        saving = plot_saving_vs_target(axes[0], results, "prediction_consistency")
        assert len(saving.get_lines()) == len(MECHANISMS)
        tradeoff = plot_tradeoff(axes[1], results, "prediction_gap")
        skip = results["tradeoffs"]["layer skipping"]
        line = tradeoff.get_lines()[MECHANISMS.index("layer skipping")]
        assert list(line.get_xdata()) == skip["flops_fraction"]
        anytime = plot_anytime(axes[2], results, "prediction_consistency")
        upper = anytime.get_lines()[0].get_ydata()
        assert list(upper) == list(
            results["anytime_curves"]["prediction_consistency"]["upper_bound"]
        )
    finally:
        plt.close(figure)


def test_the_cli_knows_the_task():
    from exitguard.cli import DEFAULT_N_CAL, build_parser

    args = build_parser().parse_args(["demo", "--task", "mechanisms"])
    assert args.task == "mechanisms" and DEFAULT_N_CAL["mechanisms"] == 300
