"""Reports from hostile results: every field escaped, no link followed, no device replaced,
huge picture grids refused before drawing, every file written atomically."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from exitguard import evaluate
from exitguard.report import RESULTS_SCHEMA, load_results, render_html, write_report
from tests.report_checks import REPORT_FILES

PAYLOAD = "<script>alert(1)</script><img src=x onerror=alert(2)>\"'&"


def results_dict():
    """A complete results dict, with every optional field the page shows."""
    rng = np.random.default_rng(0)
    losses = (rng.random((6, 300)) < np.linspace(0, 0.3, 6)[:, None]).astype(float)
    cost = np.tile(np.arange(6.0)[::-1, None], (1, 300))
    evaluation = evaluate(
        losses, procedures=["crc", "ucb-wsr"], target_risks=[0.05, 0.1], trials=3, cost=cost
    ).to_dict()
    cell = {"image": [[0.0, 0.5], [1.0, 0.25]], "cmap": "gray", "vmin": 0.0, "vmax": 1.0}
    return {
        "schema": RESULTS_SCHEMA,
        "schema_version": 1,
        "task": "test",
        "title": "a report",
        "created": "2026-01-01T00:00:00+00:00",
        "exitguard_version": "0.1",
        "summary": ["one line", "two lines"],
        "settings": {
            "delta": 0.1,
            "n_cal": 100,
            "trials": 3,
            "target_risks": [0.05, 0.1],
            "table_target_risks": [0.05, 0.1],
        },
        "dataset": {"name": "toy", "source": "made up", "n_train": 10, "n_heldout": 300},
        "model": {
            "description": "a toy model",
            "n_exits": 3,
            "flops_per_exit": [1.0, 2.0, 3.0],
            "accuracy_per_exit": [0.5, 0.6, 0.7],
            "accuracy_label": "accuracy",
            "flops_unit": "MFLOPs",
        },
        "risk_titles": {"prediction_gap": "gap"},
        "risks": {
            "prediction_gap": {
                "loss_bound": 1.0,
                "evaluation": evaluation,
                "evaluation_exits": copy.deepcopy(evaluation),
            }
        },
        "exit_histogram": {
            "risk": "prediction_gap",
            "procedure": "crc",
            "target_risk": 0.05,
            "counts": [3, 2, 1],
            "unit": "samples",
        },
        "timing": {"measured_speedup": 1.5, "batch_size": 8},
        "figures": [
            {
                "file": "grid.png",
                "title": "pictures",
                "caption": "a caption",
                "columns": ["a", "b"],
                "rows": [{"label": "x", "cells": [cell, cell]}],
                "colorbar": "value",
            }
        ],
        "tables": [{"title": "extra", "header": ["h1", "h2"], "rows": [["r", 0.5]], "note": "n"}],
    }


def leaf_paths(value, path=()):
    """Every path to a leaf value, and to every key, of a JSON-like value."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield (*path, ("key", key))
            yield from leaf_paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from leaf_paths(item, (*path, index))
    else:
        yield path


def poisoned(results, path):
    """A copy of ``results`` with the value (or key) at ``path`` replaced by the payload."""
    copied = copy.deepcopy(results)
    *parents, last = path
    holder = copied
    for step in parents:
        holder = holder[step]
    if isinstance(last, tuple):  # a key
        holder[PAYLOAD] = holder.pop(last[1])
    else:
        holder[last] = PAYLOAD
    return copied


def test_the_clean_page_renders(tmp_path):
    page = write_report(results_dict(), tmp_path)
    assert "<script" not in page.read_text().lower()


def test_every_field_is_escaped_or_refused():
    """Each value and key in turn holds markup: the page never contains it unescaped."""
    results = results_dict()
    paths = list(leaf_paths(results))
    assert len(paths) > 150
    shown = 0
    for path in paths:  # a loop over fields: each one poisoned on its own
        try:
            page = render_html(poisoned(results, path))
        except ValueError:
            continue  # refused with a clear error: fine
        assert "<script" not in page.lower() and "<img src=x" not in page, path
        shown += "&lt;script&gt;" in page
    assert shown > 20  # most text fields are shown, escaped


def test_numbers_shown_raw_must_be_numbers():
    for key in ("n_cal", "trials", "delta"):
        results = results_dict()
        results["settings"][key] = PAYLOAD
        with pytest.raises(ValueError, match=rf"`settings\.{key}` must be a number"):
            render_html(results)


def test_a_link_at_a_temporary_name_is_never_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "report"
    out.mkdir()
    for name in REPORT_FILES:  # where predictable temporary names would be
        (out / f".{name}.tmp").symlink_to(victim)
    write_report(results_dict(), out)
    assert victim.read_text() == "precious"
    assert all((out / f".{name}.tmp").is_symlink() for name in REPORT_FILES)
    assert all((out / name).is_file() and not (out / name).is_symlink() for name in REPORT_FILES)


@pytest.mark.parametrize("name", ["index.html", "results.json", "test_risk.png", "grid.png"])
def test_links_in_the_output_folder_are_never_followed(tmp_path, name):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "report"
    out.mkdir()
    (out / name).symlink_to(victim)
    refusal = ""
    try:
        write_report(results_dict(), out)
    except ValueError as error:
        refusal = str(error)
    assert victim.read_text() == "precious"
    assert "symbolic link; refusing to replace it" in refusal  # refused, naming the link
    assert sorted(p.name for p in out.iterdir()) == [name]  # before anything was written


@pytest.mark.parametrize("device", ["/dev/null", "fifo"])
def test_out_on_a_device_or_fifo_is_refused(tmp_path, device):
    if device == "fifo":
        device = tmp_path / "fifo"
        os.mkfifo(device)
    with pytest.raises(ValueError, match=r"out: .* is a (device|FIFO); a report is a folder"):
        write_report(results_dict(), device)
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")


def test_a_failed_write_leaves_the_old_report(tmp_path, monkeypatch):
    write_report(results_dict(), tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in REPORT_FILES}
    changed = results_dict()
    changed["title"] = "changed"
    real = os.replace

    def full_disk(source, target, *args, **kwargs):
        if str(target).endswith("index.html"):
            raise OSError(28, "No space left on device")
        return real(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match=r"No space left on device"):
        write_report(changed, tmp_path)
    assert (tmp_path / "index.html").read_bytes() == before["index.html"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


HUGE_GRIDS = """
import sys
sys.path.insert(0, sys.argv[2])
from exitguard.report import write_report
from tests.hostile.test_report_files import results_dict
for case, (rows, columns, side) in enumerate([(2000, 2, 1), (2, 500, 1), (1, 1, 5000)]):
    results = results_dict()
    image = [[0.5] * side for _ in range(side)]
    results["figures"][0]["columns"] = ["c"] * columns
    results["figures"][0]["rows"] = [
        {"label": "r", "cells": [{"image": image}] * columns} for _ in range(rows)
    ]
    try:
        write_report(results, f"{sys.argv[1]}/{case}")
        print("drawn")
    except ValueError as error:
        print("refused:", error)
    sys.stdout.flush()
"""


def test_huge_picture_grids_are_refused_before_drawing(tmp_path):
    """In a child process with a time limit: drawing such a grid would take the machine."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        done = subprocess.run(
            [sys.executable, "-c", HUGE_GRIDS, str(tmp_path), root],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("drawing huge picture grids did not finish in 120 s")
    lines = done.stdout.splitlines()
    assert len(lines) == 3, done.stdout + done.stderr[-2000:]
    for line, message in zip(
        lines,
        [
            "at most 40 rows and 16 columns; got 2000 x 2",
            "at most 40 rows and 16 columns; got 2 x 500",
            "at most 2048 pixels on a side; got 5000 x 5000",
        ],
        strict=True,
    ):
        assert line.startswith("refused:") and message in line, line
    assert not any(tmp_path.glob("*/results.json"))  # refused before anything was written


def test_a_grid_drawn_too_large_is_refused(tmp_path):
    results = results_dict()
    wide = [[0.0] * 600 for _ in range(10)]  # aspect 60: wide cells
    results["figures"][0]["columns"] = ["c"] * 16
    results["figures"][0]["rows"] = [{"cells": [{"image": wide}] * 16} for _ in range(40)]
    with pytest.raises(ValueError, match=r"the drawn grid would have .* pixels; the limit"):
        write_report(results, tmp_path / "r")


def test_results_files_are_read_strictly(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"schema": RESULTS_SCHEMA})[:-1] + ', "schema": "other"}')
    with pytest.raises(ValueError, match=r"duplicate key"):
        load_results(path)
    path.write_text("[" * 100 + "]" * 100)
    with pytest.raises(ValueError, match=r"nested too deeply"):
        load_results(path)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=r"FIFO"):
        load_results(fifo)


def test_a_written_report_rebuilds_from_its_results(tmp_path):
    results = results_dict()
    results["timing"]["not_measured"] = float("nan")
    write_report(results, tmp_path / "a")
    stored = json.loads((tmp_path / "a" / "results.json").read_text())
    assert stored["timing"]["not_measured"] is None  # strict JSON: NaN is written as null
    write_report(load_results(tmp_path / "a" / "results.json"), tmp_path / "b")
    assert (tmp_path / "b" / "index.html").read_text() == (
        tmp_path / "a" / "index.html"
    ).read_text()
