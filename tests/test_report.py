"""The report folder: built from results.json, rebuilt by `exitguard report`, valid in a browser."""

import json
import shutil
import subprocess

import pytest

pytest.importorskip("matplotlib")

from exitguard import evaluate
from exitguard.cli import main
from exitguard.report import RESULTS_SCHEMA, load_results, rebuild_report, write_report

FILES = (
    "index.html",
    "results.json",
    "test_risk.png",
    "violations.png",
    "efficiency.png",
    "exit_histogram.png",
)


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
    for name in FILES:
        assert (tmp_path / name).stat().st_size > 0, name
    text = page.read_text()
    assert "test &lt;report&gt;" in text and "<script" not in text
    assert (tmp_path / "keep.txt").read_text() == "user file"
    for name in FILES[2:]:
        (tmp_path / name).unlink()
    other = tmp_path / "again"
    rebuild_report(tmp_path / "results.json", out=other)
    assert all((other / name).stat().st_size > 0 for name in FILES)
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
