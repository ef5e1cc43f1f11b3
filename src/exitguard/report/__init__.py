"""Report folders: ``index.html``, PNG plots beside it, and the ``results.json`` behind them.

The page is static HTML (no scripts), so it opens anywhere; ``exitguard report RESULTS.json``
rebuilds it from the JSON alone.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from exitguard.report.plots import check_figures, draw_all, risk_title

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


def _cell(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return html.escape(str(value))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
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
    """The report page for a results dict (see :func:`write_report`)."""
    settings = results["settings"]
    model = results["model"]
    dataset = results["dataset"]
    timing = results.get("timing", {})
    title = html.escape(results.get("title", "exitguard report"))
    summary = "".join(f"<li>{html.escape(line)}</li>" for line in results.get("summary", []))
    shown = {
        round(float(e), 6) for e in settings.get("table_target_risks", settings["target_risks"])
    }
    sections = []
    for risk, data in results["risks"].items():
        sections.append(
            f"<h3>{html.escape(risk_title(results, risk))} (B = {data['loss_bound']:g})</h3>"
            + _risk_table(data, shown)
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
        f"<h3>{html.escape(str(spec.get('title', '')))}</h3>"
        f'<p class="note">{html.escape(str(spec.get("caption", "")))}</p>'
        f'<img src="{html.escape(str(spec["file"]))}" alt="picture grid">'
        for spec in results.get("figures", [])
    )
    extra_tables = "".join(
        f"<h3>{html.escape(str(table.get('title', '')))}</h3>"
        + _table([str(h) for h in table["header"]], table["rows"])
        + f'<p class="note">{html.escape(str(table.get("note", "")))}</p>'
        for table in results.get("tables", [])
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_STYLE}</style></head>
<body>
<h1>{title}</h1>
<div class="summary"><ul>{summary}</ul></div>
<h2>Guarantees</h2>
<p>Calibrated on n = {settings["n_cal"]} samples and checked on the rest of the held-out data
over {settings["trials"]} random splits (δ = {settings["delta"]:g}).
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
<p>{html.escape(str(model.get("description", "")))}</p>
{_table(["exit", flops_label, accuracy_label], exit_rows)}
<p class="note">Dataset: {html.escape(str(dataset.get("name")))}
({html.escape(str(dataset.get("source", "")))}); {_cell(dataset.get("n_train"))} training and
{_cell(dataset.get("n_heldout"))} held-out {unit}. Created {html.escape(results.get("created", ""))}
with exitguard {html.escape(results.get("exitguard_version", ""))}.</p>
</body></html>
"""


def write_report(results: Mapping[str, Any], folder: str | os.PathLike[str]) -> Path:
    """Write ``results.json``, the PNG plots and ``index.html`` into ``folder``.

    Existing files of the same names are replaced; nothing else in the folder is touched.
    """
    check_figures(results)  # before anything is written
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    results_path = target / "results.json"
    temporary = target / ".results.json.tmp"
    temporary.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, results_path)
    draw_all(results, target)
    (target / "index.html").write_text(render_html(results), encoding="utf-8")
    return target / "index.html"


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a results.json written by a demo, checking its schema."""
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"RESULTS: no such file: {source}")
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"RESULTS: {source} is not valid JSON ({error}).") from error
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
