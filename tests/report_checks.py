"""Checks every demo's report must pass: the certified column, the exit convention stated on
the page, the results behind it, and a folder that holds this run's files only."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from exitguard.report import EXIT_CONVENTION, write_report
from exitguard.report.folder import MANIFEST

REPORT_PLOTS = ("test_risk.png", "violations.png", "efficiency.png", "exit_histogram.png")
REPORT_FILES = ("index.html", "results.json", *REPORT_PLOTS)
"""The files of every demo's report page (a demo may add picture grids and data files)."""

EARLIER_PAGE = "earlier_grid.png"
EARLIER_DATA = "table_earlier.npz"


def earlier_report(folder: Path) -> None:
    """An earlier run's report in ``folder``, with a picture grid and a data file that no
    demo writes: a later run must remove both."""
    from tests.conftest import calm_table
    from tests.test_report import fake_results

    results = fake_results(calm_table())
    cell = {"image": [[0.0, 1.0], [1.0, 0.0]]}
    results["figures"] = [
        {"file": EARLIER_PAGE, "columns": ["a"], "rows": [{"label": "x", "cells": [cell]}]}
    ]
    write_report(results, folder, data={EARLIER_DATA: b"an earlier table"})
    assert (folder / EARLIER_PAGE).is_file() and (folder / EARLIER_DATA).is_file()


def check_demo_report(folder: Path, results, *, data_files=()) -> str:
    """Assert what every demo page must show; returns the page's text.

    ``data_files`` are the data files the demo writes beside the page (tables, outputs, the
    policy); with the page's own files they must be all the folder holds.
    """
    folder = Path(folder)
    page = (folder / "index.html").read_text()
    saved = json.loads((folder / "results.json").read_text())
    assert saved == json.loads(json.dumps(results.to_dict()))
    assert html.escape(EXIT_CONVENTION, quote=True) in page, "the exit convention"
    if saved["task"] != "drift":
        tables = page.count("<th>certified</th>")
        assert tables == len(results.risks), f"a certified column per risk table ({tables})"
        assert "no guarantee" in page
        last = results.model.n_exits - 1
        assert f"exit 0 to exit {last}" in page
    manifest = json.loads((folder / MANIFEST).read_text())
    for name in data_files:
        assert name in manifest["data"], name
        assert (folder / name).stat().st_size > 0, name
    expected = {*manifest["page"], *manifest["data"], MANIFEST}
    assert set(os.listdir(folder)) == expected, "no file of an earlier run is left behind"
    assert EARLIER_PAGE not in expected and EARLIER_DATA not in expected
    for name in manifest["page"]:
        assert (folder / name).stat().st_size > 0, name
    return page
