"""The report folder: built from results.json, rebuilt by `exitguard report`, valid in a browser."""

import json
import shutil
import subprocess

import pytest

pytest.importorskip("matplotlib")

from exitguard import evaluate
from exitguard.cli import main
from exitguard.report import (
    RESULTS_SCHEMA,
    load_results,
    rebuild_report,
    render_html,
    write_report,
)
from tests.report_checks import REPORT_FILES, REPORT_PLOTS


def fake_results(calm):
    """A results dict in the demo's format, built from the CALM table (two 'risks')."""
    losses = calm["losses"][::5]
    evaluation = evaluate(
        losses,
        procedures=["crc", "ucb-wsr"],
        target_risks=[0.05, 0.1],
        trials=5,
        cost=calm["cost"][::5],
    )
    risk = {
        "loss_bound": 1.0,
        "evaluation": evaluation.to_dict(),
        "evaluation_exits": evaluation.to_dict(),
    }
    return {
        "schema": RESULTS_SCHEMA,
        "schema_version": 1,
        "title": "test <report>",
        "summary": ["one line"],
        "settings": {"delta": 0.1, "n_cal": 100, "trials": 5, "target_risks": [0.05, 0.1]},
        "dataset": {"name": "calm", "n_train": 0, "n_heldout": 2000},
        "model": {
            "n_exits": 15,
            "flops_per_exit": list(range(1, 16)),
            "accuracy_per_exit": [0.5] * 15,
        },
        "risks": {"prediction_gap": risk, "prediction_consistency": risk},
        "exit_histogram": {
            "risk": "prediction_gap",
            "procedure": "crc",
            "target_risk": 0.05,
            "counts": list(range(15)),
        },
        "timing": {"measured speed-up, batch 256": 1.5},
    }


def test_write_and_rebuild(calm, tmp_path):
    results = fake_results(calm)
    (tmp_path / "keep.txt").write_text("user file")
    page = write_report(results, tmp_path)
    for name in REPORT_FILES:
        assert (tmp_path / name).stat().st_size > 0, name
    text = page.read_text()
    assert "test &lt;report&gt;" in text and "<script" not in text
    assert (tmp_path / "keep.txt").read_text() == "user file"
    for name in REPORT_PLOTS:
        (tmp_path / name).unlink()
    other = tmp_path / "again"
    rebuild_report(tmp_path / "results.json", out=other)
    assert all((other / name).stat().st_size > 0 for name in REPORT_FILES)
    assert json.loads((other / "results.json").read_text()) == results


def test_report_command(calm, tmp_path, capsys):
    write_report(fake_results(calm), tmp_path)
    assert main(["report", str(tmp_path / "results.json"), "--out", str(tmp_path / "x")]) == 0
    assert (tmp_path / "x" / "index.html").is_file()
    assert main(["report", str(tmp_path / "missing.json")]) == 2
    (tmp_path / "bad.json").write_text('{"schema": "other"}')
    assert main(["report", str(tmp_path / "bad.json")]) == 2
    assert "not an exitguard demo result" in capsys.readouterr().err


def test_load_rejects_non_json(tmp_path):
    (tmp_path / "r.json").write_text("nope")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_results(tmp_path / "r.json")


PROBE = (
    "<script>window.addEventListener('load', () => { for (const image of document.images) {"
    " if (!image.complete || image.naturalWidth === 0) console.error('broken image ' + image.src);"
    " } console.log('probe done ' + document.images.length); });</script>"
)


def chromium_console(page, profile):
    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium chromium-driver)")
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=5000",
        "--dump-dom",
        page.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return [line for line in done.stderr.splitlines() if ":CONSOLE" in line], done.stdout


@pytest.mark.slow
def test_page_opens_in_headless_chromium_without_console_errors(calm, tmp_path):
    """Needs Debian's chromium; skipped when absent. Images are checked by a probe script
    added to a copy of the page (the report itself has no scripts)."""
    page = write_report(fake_results(calm), tmp_path)
    console, dom = chromium_console(page, tmp_path / "profile")
    assert console == [], console
    assert "<h1>" in dom and "test_risk.png" in dom
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    console, _ = chromium_console(probe, tmp_path / "profile2")
    assert any("probe done 4" in line for line in console), console
    assert not any("broken image" in line for line in console), console
    (tmp_path / "violations.png").unlink()  # the probe must notice a missing image
    console, _ = chromium_console(probe, tmp_path / "profile3")
    assert any("broken image" in line and "violations.png" in line for line in console), console


def test_picture_grids_and_extra_tables(calm, tmp_path):
    results = fake_results(calm)
    cell = {"image": [[0.0, 0.5], [1.0, 0.25]], "cmap": "gray", "vmin": 0.0, "vmax": 1.0}
    results["figures"] = [
        {
            "file": "grid.png",
            "title": "pictures <b>",
            "caption": "a caption",
            "columns": ["a", "b"],
            "rows": [{"label": "x", "cells": [cell, cell]}, {"label": "y", "cells": [cell, cell]}],
            "colorbar": "value",
        }
    ]
    results["tables"] = [{"title": "Table 1", "header": ["h1", "h2"], "rows": [["r", 0.5]]}]
    page = write_report(results, tmp_path)
    assert (tmp_path / "grid.png").stat().st_size > 0
    text = page.read_text()
    assert 'src="grid.png"' in text and "pictures &lt;b&gt;" in text and "Table 1" in text


@pytest.mark.parametrize("name", ["../grid.png", "test_risk.png", "grid.svg", "a/b.png", ""])
def test_picture_grid_file_names_are_checked(calm, tmp_path, name):
    results = fake_results(calm)
    cell = {"image": [[0.0]]}
    results["figures"] = [{"file": name, "columns": ["a"], "rows": [{"cells": [cell]}]}]
    with pytest.raises(ValueError, match="plain PNG file name"):
        write_report(results, tmp_path / "report")
    assert not (tmp_path / "report").exists()  # checked before anything is written


def test_picture_grid_rows_must_fill_the_columns(calm, tmp_path):
    results = fake_results(calm)
    cell = {"image": [[0.0]]}
    results["figures"] = [{"file": "g.png", "columns": ["a", "b"], "rows": [{"cells": [cell]}]}]
    with pytest.raises(ValueError, match="1 cells for 2 columns"):
        write_report(results, tmp_path)


# ----------------------------------------------------------- typed results and their plots


def typed_results(*, speedups=(1.5,), n_exits=4):
    """DemoResults of a synthetic table with every procedure kind (naive, crc, ucb, ltt)."""
    import numpy as np

    from exitguard.report.results import (
        DatasetInfo,
        DemoResults,
        Machine,
        ModelInfo,
        RiskResult,
        Settings,
        Speed,
        TimedPolicy,
        summary_lines,
    )

    rng = np.random.default_rng(0)
    k, n = 12, 400
    grid = np.linspace(0.0, 0.4, k)[:, None]  # risk grows along the grid
    losses = (rng.random((k, n)) < grid).astype(float)
    exits = np.minimum(np.arange(k)[::-1, None] * n_exits // k, n_exits - 1).repeat(n, axis=1)
    flops = np.arange(1.0, n_exits + 1)
    settings = Settings(
        delta=0.1, n_cal=150, trials=20, target_risks=(0.005, 0.01, 0.05, 0.1, 0.2)
    )
    common = dict(
        procedures=("naive", "crc", "ucb-wsr", "ltt"),
        target_risks=settings.target_risks,
        delta=settings.delta,
        n_cal=settings.n_cal,
        trials=settings.trials,
        seed=0,
    )
    risk = RiskResult(
        title="prediction gap",
        loss_bound=1.0,
        evaluation=evaluate(losses, cost=flops[exits], **common),
        evaluation_exits=evaluate(losses, cost=exits.astype(float), **common),
    )
    timed = TimedPolicy(
        procedure="ucb-wsr",
        risk="prediction_gap",
        target_risk=0.05,
        threshold=0.8,
        certified=True,
        n_cal=150,
        n_test=250,
        unit="images",
        exit_counts=(100, 50, 40, 60)[:n_exits],
        mean_exit=1.24,
        flops_saving=0.38,
        speeds=tuple(
            Speed(batch_size=b, speedup=s) for b, s in zip((256, 1), speedups, strict=False)
        ),
    )
    risks = {"prediction_gap": risk}
    return DemoResults(
        task="test",
        title="typed",
        summary=tuple(summary_lines(risks, settings, timed)),
        dataset=DatasetInfo(name="toy", n_heldout=n),
        model=ModelInfo(description="toy", n_exits=n_exits, flops_per_exit=tuple(flops)),
        settings=settings,
        risks=risks,
        timed=timed,
        machine=Machine(python="3.11", torch="2.13.0", threads=2, platform="Linux x86_64"),
    )


@pytest.fixture(scope="module")
def typed():
    return typed_results()


@pytest.fixture
def ax():
    from exitguard.report.plots import _pyplot

    plt = _pyplot()
    figure, axis = plt.subplots()
    yield axis
    plt.close(figure)


def lines_by_label(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def test_test_risk_plot_draws_each_procedures_mean_test_risk(typed, ax):
    import numpy as np

    from exitguard.report.plots import plot_test_risk

    assert plot_test_risk(ax, typed, "prediction_gap") is ax
    lines = lines_by_label(ax)
    evaluation = typed.risks["prediction_gap"].evaluation
    for label, procedure in (
        ("naive (no guarantee)", "naive"),
        ("crc (E[risk] ≤ ε)", "crc"),
        ("ucb-wsr (P(risk ≤ ε) ≥ 1 − δ)", "ucb-wsr"),
    ):
        rows = sorted(
            (r for r in evaluation.rows if r.procedure == procedure), key=lambda r: r.target_risk
        )
        np.testing.assert_allclose(lines[label].get_ydata(), [r.mean_test_risk for r in rows])
    target = lines["risk = ε"]
    np.testing.assert_array_equal(target.get_xdata(), target.get_ydata())
    assert ax.get_xscale() == "log" and ax.get_yscale() == "symlog"  # straight risk = ε
    assert [t.get_text() for t in ax.get_legend().get_texts()][-1] == "risk = ε"


def test_violation_plot_marks_what_delta_bounds(typed, ax):
    import numpy as np

    from exitguard.report.plots import plot_violations

    plot_violations(ax, typed, "prediction_gap")
    lines = lines_by_label(ax)
    assert "crc (promises the mean risk; not bounded by δ)" in lines
    assert "naive (no guarantee)" in lines
    np.testing.assert_array_equal(lines["δ = 0.1"].get_ydata(), [0.1, 0.1])
    rows = [r for r in typed.risks["prediction_gap"].evaluation.rows if r.procedure == "ltt"]
    np.testing.assert_allclose(
        lines["ltt (P(risk ≤ ε) ≥ 1 − δ)"].get_ydata(),
        [r.population_violation_rate for r in sorted(rows, key=lambda r: r.target_risk)],
    )


def test_mean_exit_plot_counts_exits_from_zero(typed, ax):
    import numpy as np

    from exitguard.report.plots import plot_mean_exit

    plot_mean_exit(ax, typed, "prediction_gap")
    rows = sorted(
        (r for r in typed.risks["prediction_gap"].evaluation_exits.rows if r.procedure == "crc"),
        key=lambda r: r.target_risk,
    )
    line = lines_by_label(ax)["crc (E[risk] ≤ ε)"]
    np.testing.assert_allclose(line.get_ydata(), [r.mean_cost for r in rows])
    assert 0 <= min(line.get_ydata()) and max(line.get_ydata()) <= 3
    assert list(ax.get_yticks()) == [0, 1, 2, 3]
    assert ax.get_ylabel() == "mean exit (0 = first, 3 = full model)"


def test_exit_histogram_draws_the_timed_policys_shares(typed, ax):
    import numpy as np

    from exitguard.report.plots import plot_exit_histogram

    plot_exit_histogram(ax, typed)
    heights = [patch.get_height() for patch in ax.patches]
    counts = np.asarray(typed.timed.exit_counts)
    np.testing.assert_allclose(heights, counts / counts.sum())
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["0", "1", "2", "3\n(full)"]
    assert ax.get_xlabel() == "exit (0 = first, 3 = full model)"


@pytest.mark.parametrize(
    ("ratio", "words"),
    [
        (1.35, "1.35× faster than the full model"),
        (0.99, "1.01× slower than the full model"),
        (0.5, "2.00× slower than the full model"),
        (1.001, "as fast as the full model (1.00×)"),
        (float("nan"), "not measured"),
    ],
)
def test_speed_phrase(ratio, words):
    from exitguard.report.results import speed_phrase

    assert speed_phrase(ratio) == words


def test_summary_separates_the_mean_over_splits_from_the_one_run():
    results = typed_results(speedups=(1.4, 0.99))
    over_splits, one_run, slower = results.summary
    row = results.risks["prediction_gap"].evaluation.row("ucb-wsr", 0.05)
    exits = results.risks["prediction_gap"].evaluation_exits.row("ucb-wsr", 0.05)
    assert over_splits.startswith("ucb-wsr on prediction gap at ε = 0.05")
    assert "mean over 20 random calibration/test splits" in over_splits
    assert f"mean exit {exits.mean_cost:.2f} (0-based)" in over_splits
    assert f"{100 * row.relative_saving:.1f}% of FLOPs saved" in over_splits
    assert one_run.startswith("The one policy run for real (certified; calibrated on one split")
    assert "mean exit 1.24," in one_run and "38.0% of FLOPs saved (FLOPs-ideal 1.61×)" in one_run
    assert "1.40× faster than the full model at batch 256" in one_run
    assert "1.01× slower than the full model at batch 1" in one_run
    assert slower.startswith("At batch 1 this policy is 1.01× slower than the full model")
    page = render_html(results)
    assert '<li class="slower">At batch 1' in page
    assert page.count('<li class="slower">') == 1  # that line only, not the one-run line
    assert "mean exit (0-based), mean over 20 splits" in page


def test_tables_have_a_certified_column(typed):
    from exitguard.report import RISK_TABLE_HEADER, risk_table_rows

    rows = risk_table_rows(typed, "prediction_gap")
    column = RISK_TABLE_HEADER.index("certified")
    by_procedure = {(row[0], row[3]): row for row in rows}
    assert by_procedure[("naive", 0.05)][column] == "no guarantee"
    assert by_procedure[("naive", 0.05)][1] == "no guarantee"
    evaluation = typed.risks["prediction_gap"].evaluation
    for procedure in ("crc", "ucb-wsr", "ltt"):
        rate = evaluation.row(procedure, 0.05).certified_rate
        assert by_procedure[(procedure, 0.05)][column] == f"{100 * rate:.0f}%"
    page = render_html(typed)
    assert "<th>certified</th>" in page and "Machine: Python 3.11, torch 2.13.0, 2 CPU" in page


def test_typed_results_round_trip_through_json(typed, tmp_path):
    from exitguard.report import read_results

    write_report(typed, tmp_path)
    again = read_results(tmp_path / "results.json")
    assert again.to_dict() == typed.to_dict()
    assert repr(again).startswith("DemoResults(task='test', risks=['prediction_gap'], n_exits=4")


def test_version_1_results_count_exits_from_zero(calm):
    from exitguard.report.results import DemoResults

    results = fake_results(calm)
    results["risks"]["prediction_gap"]["evaluation_exits"]["rows"][0]["mean_cost"] = 3.5
    results["timing"]["mean exit (1 = first)"] = 2.0
    typed = DemoResults.from_dict(results)
    assert typed.risks["prediction_gap"].evaluation_exits.rows[0].mean_cost == 2.5
    assert typed.timed.mean_exit == 1.0
    assert typed.timed.speeds[0].batch_size == 256 and typed.timed.speeds[0].speedup == 1.5


def drift_results():
    from exitguard.report.results import DriftDay, DriftEvent, DriftResults, MonitorSegment

    served = ["policy", "policy", "full model", "full model", "policy"]
    days = tuple(
        DriftDay(
            day=d,
            severity=0.1 * d,
            served=served[d],
            threshold=None if served[d] == "full model" else 0.8,
            risk_served=0.0 if served[d] == "full model" else 0.02 * (d + 1),
            risk_original=0.02 * (d + 1),
            flops_saved=0.0 if served[d] == "full model" else 0.4,
            audits=10,
            audit_overhead=0.05,
            accuracy_full_model=0.9,
        )
        for d in range(5)
    )
    return DriftResults(
        title="drift",
        summary=("one line",),
        settings={"target_risk": 0.05, "alpha": 0.05, "arl": 1000.0, "delta": 0.1},
        days=days,
        events=(
            DriftEvent(day=1, event="alarm", reason="e-process", audit=17),
            DriftEvent(day=3, event="recalibrated", threshold=0.9, audits=20),
        ),
        segments=(
            MonitorSegment(
                start_day=0,
                threshold=0.8,
                audits=3,
                log10_wealth=(0.1, 0.6, 1.4),
                log10_detector=(0.0, 0.2, 0.5),
            ),
        ),
        samples_needed=30,
        recalibration_window=40,
    )


def test_drift_plots_draw_the_days_and_the_fallback(ax):
    import numpy as np

    from exitguard.report.drift import fallback_spans, plot_daily_risk, plot_monitor

    results = drift_results()
    assert plot_daily_risk(ax, results) is ax
    lines = lines_by_label(ax)
    np.testing.assert_allclose(
        lines["original policy (had it stayed)"].get_ydata(), [0.02, 0.04, 0.06, 0.08, 0.1]
    )
    np.testing.assert_allclose(
        lines["served (policy, full model, recalibrated)"].get_ydata(), [0.02, 0.04, 0, 0, 0.1]
    )
    np.testing.assert_array_equal(lines["target ε = 0.05"].get_ydata(), [0.05, 0.05])
    assert fallback_spans(results.days) == [(1.5, 3.5)]
    assert ax.get_xlabel() == "day (0 = first)"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "served by the full model" in labels and "alarm (day 1)" in labels
    ax.clear()
    plot_monitor(ax, results)
    wealth = lines_by_label(ax)["e-process log10 wealth"]
    np.testing.assert_array_equal(wealth.get_xdata(), [1, 2, 3])
    np.testing.assert_allclose(wealth.get_ydata(), [0.1, 0.6, 1.4])
    np.testing.assert_allclose(
        lines_by_label(ax)["e-process alarm: 1/α = 20"].get_ydata(), [np.log10(20)] * 2
    )
