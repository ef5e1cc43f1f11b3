"""Report folders: ``index.html``, PNG plots beside it, and the ``results.json`` behind them.

The page is static HTML (no scripts), so it opens anywhere; ``exitguard report RESULTS.json``
rebuilds it from the JSON alone.

A results file is untrusted input: every value that reaches the page is HTML-escaped (numbers
are formatted as numbers, or refused), picture grids and plots are size-checked before
anything is drawn, and malformed results give a ValueError naming ``RESULTS``. Every file is
written atomically through :mod:`exitguard._files`; an existing link (or special file) at any
of the report's file names is refused before anything is written, never followed.
"""

from __future__ import annotations

import html
import json
import math
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from exitguard._files import (
    FileSafetyError,
    atomic_write,
    atomic_write_text,
    check_write_target,
    load_json,
)
from exitguard.report.plots import PLOTS, check_figures, figure_files, render_plots, risk_title

RESULTS_SCHEMA = "exitguard.DemoResults"

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1180px; margin: 2em auto; color: #222;
       line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.summary { background: #f4f7fb; border-left: 4px solid #1f77b4; padding: 0.6em 1em; }
.note { color: #555; font-size: 0.9em; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.4em 0; }
"""


_MAX_RESULTS_BYTES = 256 << 20
_MAX_RESULTS_DEPTH = 32


def _text(value: Any) -> str:
    """Any value as escaped HTML text."""
    return html.escape(str(value), quote=True)


def _number(value: Any, name: str, spec: str = "g") -> str:
    """A number formatted with ``spec``; anything else is refused (it would be shown raw)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"RESULTS: `{name}` must be a number; got {str(value)[:60]!r}.")
    return format(value, spec)


def _cell(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return html.escape(str(value))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_text(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _risk_table(data: Mapping[str, Any], targets: set[float]) -> str:
    exits = {
        (r["procedure"], round(r["target_risk"], 6)): r for r in data["evaluation_exits"]["rows"]
    }
    rows = []
    for r in data["evaluation"]["rows"]:
        if round(r["target_risk"], 6) not in targets:
            continue
        mean_exit = exits[(r["procedure"], round(r["target_risk"], 6))]["mean_cost"]
        saving = None if r["relative_saving"] is None else f"{100 * r['relative_saving']:.1f}%"
        rows.append(
            [
                r["procedure"],
                r["target_risk"],
                r["mean_test_risk"],
                r["sd_test_risk"],
                r["violation_rate"],
                r["population_violation_rate"],
                r["violation_p_value"],
                mean_exit,
                saving,
            ]
        )
    header = [
        "procedure",
        "ε",
        "test risk",
        "sd",
        "test viol.",
        "pop. viol.",
        "binomial p",
        "mean exit",
        "FLOPs saved",
    ]
    return _table(header, rows)


def render_html(results: Mapping[str, Any]) -> str:
    """The report page for a results dict (see :func:`write_report`).

    Raises
    ------
    ValueError
        When the results lack a field the page needs, or a field has the wrong type.
    """
    try:
        return _render_html(results)
    except (KeyError, TypeError, IndexError, AttributeError) as error:
        raise ValueError(
            f"RESULTS: malformed results ({type(error).__name__}: {str(error)[:200]})."
        ) from error


def _render_html(results: Mapping[str, Any]) -> str:
    settings = results["settings"]
    model = results["model"]
    dataset = results["dataset"]
    timing = results.get("timing", {})
    title = _text(results.get("title", "exitguard report"))
    summary = "".join(f"<li>{_text(line)}</li>" for line in _listed(results, "summary"))
    shown = {
        round(float(e), 6) for e in settings.get("table_target_risks", settings["target_risks"])
    }
    sections = []
    for risk, data in results["risks"].items():
        bound = _number(data["loss_bound"], "loss_bound")
        sections.append(
            f"<h3>{_text(risk_title(results, risk))} (B = {bound})</h3>" + _risk_table(data, shown)
        )
    exit_rows = [
        [f"exit {i + 1}", flops, acc]
        for i, (flops, acc) in enumerate(
            zip(
                model["flops_per_exit"],
                model.get("accuracy_per_exit", [None] * model["n_exits"]),
                strict=True,
            )
        )
    ]
    accuracy_label = str(model.get("accuracy_label", "held-out accuracy"))
    flops_label = "FLOPs to reach and decide" + (
        f" ({model['flops_unit']})" if model.get("flops_unit") else ""
    )
    unit = html.escape(str(dataset.get("unit", "images")))
    timing_rows = [[k.replace("_", " "), v] for k, v in timing.items() if not isinstance(v, dict)]
    pictures = "".join(
        f"<h3>{_text(spec.get('title', ''))}</h3>"
        f'<p class="note">{_text(spec.get("caption", ""))}</p>'
        f'<img src="{_text(name)}" alt="picture grid">'
        for spec, name in zip(_listed(results, "figures"), figure_files(results), strict=True)
    )
    extra_tables = "".join(
        f"<h3>{_text(table.get('title', ''))}</h3>"
        + _table([str(h) for h in table["header"]], table["rows"])
        + f'<p class="note">{_text(table.get("note", ""))}</p>'
        for table in _listed(results, "tables")
    )
    n_cal = _number(settings["n_cal"], "settings.n_cal")
    trials = _number(settings["trials"], "settings.trials")
    delta = _number(settings["delta"], "settings.delta")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_STYLE}</style></head>
<body>
<h1>{title}</h1>
<div class="summary"><ul>{summary}</ul></div>
<h2>Guarantees</h2>
<p>Calibrated on n = {n_cal} samples and checked on the rest of the held-out data
over {trials} random splits (δ = {delta}).
<b>crc</b>: E[risk] ≤ ε over calibration draws. <b>ucb-wsr</b>, <b>ltt</b>:
P(risk ≤ ε) ≥ 1 − δ. <b>naive</b>: no guarantee. All assume calibration and deployment data
are exchangeable. A <i>test violation</i> is a split whose test risk exceeds ε; a
<i>population violation</i> compares the policy's risk on all held-out data with ε (free of the
test split's own noise); the binomial p-value tests "population violation rate ≤ δ".</p>
<h2>Test risk against the target</h2><img src="test_risk.png" alt="test risk against target risk">
<h2>Violations</h2><img src="violations.png" alt="violation rate against target risk">
<h2>Efficiency</h2><img src="efficiency.png" alt="mean exit and FLOPs saving against target risk">
<h2>Real inference</h2>
{_table(["measure", "value"], timing_rows)}
<img src="exit_histogram.png" alt="histogram of exits taken">
{"<h2>Pictures</h2>" + pictures if pictures else ""}
<h2>Tables</h2>{extra_tables}{"".join(sections)}
<h2>Model and data</h2>
<p>{_text(model.get("description", ""))}</p>
{_table(["exit", flops_label, accuracy_label], exit_rows)}
<p class="note">Dataset: {_text(dataset.get("name"))}
({_text(dataset.get("source", ""))}); {_cell(dataset.get("n_train"))} training and
{_cell(dataset.get("n_heldout"))} held-out {unit}. Created {_text(results.get("created", ""))}
with exitguard {_text(results.get("exitguard_version", ""))}.</p>
</body></html>
"""


def _finite_or_null(value: Any) -> Any:
    """``value`` with NaN and infinities as None: strict JSON, which :func:`load_results` reads."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


def _listed(results: Mapping[str, Any], key: str) -> list[Any]:
    value = results.get(key, [])
    if not isinstance(value, list):
        raise ValueError(f"RESULTS: `{key}` must be a list; got {type(value).__name__}.")
    return value


def _report_folder(folder: str | os.PathLike[str]) -> Path:
    """The report folder, created if needed; anything there that is not a folder is refused."""
    target = Path(folder)
    try:
        info = os.stat(target)  # a link to a folder the caller named is followed
    except FileNotFoundError:
        info = None
    if info is not None and not stat.S_ISDIR(info.st_mode):
        kind = "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else None
        kind = kind or ("a FIFO" if stat.S_ISFIFO(info.st_mode) else "not a folder")
        raise FileSafetyError(
            f"out: {target} is {kind}; a report is a folder of files (give a new or existing "
            "folder)."
        )
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FileSafetyError(
            f"out: cannot create the report folder {target} ({error.strerror or error})."
        ) from error
    return target


def write_report(results: Mapping[str, Any], folder: str | os.PathLike[str]) -> Path:
    """Write ``results.json``, the PNG plots and ``index.html`` into ``folder``.

    Everything is checked and drawn in memory first; a malformed results dict, a picture
    grid over the size limits, or an existing link or special file at any of the report's
    file names is refused before anything is written. Each file is then replaced
    atomically; nothing else in the folder is touched.

    Raises
    ------
    ValueError
        Malformed results, or a picture grid or plot over the limits.
    exitguard.FileSafetyError
        ``folder`` exists and is not a folder (a device, a FIFO, a file), or a report file
        name there is a link or a special file.
    """
    check_figures(results)  # names and sizes, before anything is drawn or written
    results = _finite_or_null(results)  # what results.json will hold, and what is shown
    page = render_html(results)
    text = json.dumps(results, indent=2, allow_nan=False) + "\n"
    target = _report_folder(folder)
    names = ["results.json", *PLOTS, *figure_files(results), "index.html"]
    for name in names:
        check_write_target(target / name, argument="out")
    pictures = render_plots(results)  # (name -> PNG bytes), all drawn before any write
    atomic_write_text(target / "results.json", text, argument="out")
    for name, data in pictures.items():
        atomic_write(target / name, data, argument="out")
    atomic_write_text(target / "index.html", page, argument="out")
    return target / "index.html"


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a results.json written by a demo, checking its schema.

    Files over 256 MiB, nested deeper than 32 levels, with duplicate keys or NaN, or that are
    not regular files are refused before they are parsed.
    """
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"RESULTS: no such file: {source}")
    try:
        data = load_json(
            source, max_bytes=_MAX_RESULTS_BYTES, max_depth=_MAX_RESULTS_DEPTH, argument="RESULTS"
        )
    except FileSafetyError:
        raise
    except ValueError as error:
        raise ValueError(f"RESULTS: {source} is not valid JSON ({error})") from error
    if not isinstance(data, dict) or data.get("schema") != RESULTS_SCHEMA:
        raise ValueError(
            f"RESULTS: {source} is not an exitguard demo result (schema must be "
            f"{RESULTS_SCHEMA!r})."
        )
    return data


def rebuild_report(
    path: str | os.PathLike[str], *, out: str | os.PathLike[str] | None = None
) -> Path:
    """Rebuild a report folder from its ``results.json`` (into ``out``, default beside it)."""
    results = load_results(path)
    folder = Path(out) if out is not None else Path(path).parent
    return write_report(results, folder)
