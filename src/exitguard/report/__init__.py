"""Report folders: ``index.html``, PNG plots beside it, and the ``results.json`` behind them.

The page is static HTML (no scripts), so it opens anywhere; ``exitguard report RESULTS.json``
rebuilds it from the JSON alone, for every task (the drift demo's page included). The
results are typed (:class:`DemoResults`, :class:`DriftResults`, see
:mod:`exitguard.report.results`); the plot functions draw on a given matplotlib axis
(:mod:`exitguard.report.plots`).

A results file is untrusted input: every value that reaches the page is HTML-escaped (numbers
are formatted as numbers, or refused), picture grids and plots are size-checked before
anything is drawn, and malformed results give a ValueError naming ``RESULTS``. A report is
written into a fresh folder and swapped into place (:mod:`exitguard.report.folder`): no file
of an earlier run is left behind, every file is written atomically through
:mod:`exitguard._files`, and an existing link (or special file) at any of the report's file
names is refused before anything is written, never followed.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from exitguard._files import load_json
from exitguard.report.folder import Writer, publish
from exitguard.report.plots import PLOTS, check_figures, render_plots
from exitguard.report.results import (
    EXIT_CONVENTION,
    RESULTS_SCHEMA,
    SCHEMA_VERSION,
    DemoResults,
    DriftResults,
    PictureGrid,
    RiskResult,
    Table,
    TimedPolicy,
    guarantee_of,
    results_from_dict,
    speed_phrase,
)

__all__ = [
    "EXIT_CONVENTION",
    "RESULTS_SCHEMA",
    "SCHEMA_VERSION",
    "DemoResults",
    "DriftResults",
    "load_results",
    "read_results",
    "rebuild_report",
    "render_html",
    "write_report",
]

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1180px; margin: 2em auto; color: #222;
       line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.summary { background: #f4f7fb; border-left: 4px solid #1f77b4; padding: 0.6em 1em; }
.convention { background: #fbf8ef; border-left: 4px solid #c9a227; padding: 0.4em 1em; }
.note { color: #555; font-size: 0.9em; }
.slower { color: #a61b1b; font-weight: 600; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.4em 0; }
"""

_MAX_RESULTS_BYTES = 256 << 20
_MAX_RESULTS_DEPTH = 32


def _text(value: Any) -> str:
    """Any value as escaped HTML text."""
    return html.escape(str(value), quote=True)


def _cell(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "–" if not math.isfinite(value) else f"{value:.{digits}g}"
    return html.escape(str(value))


def _table(header: list[str] | tuple[str, ...], rows: Any) -> str:
    head = "".join(f"<th>{_text(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _percent(value: float | None) -> str | None:
    return None if value is None else f"{100 * value:.1f}%"


RISK_TABLE_HEADER = (
    "procedure",
    "guarantee",
    "certified",
    "ε",
    "test risk",
    "sd",
    "test viol.",
    "pop. viol.",
    "binomial p",
    "mean exit",
    "FLOPs saved",
)
"""Columns of a risk's table on the page (``certified``: share of splits certified)."""


def risk_table_rows(results: DemoResults, risk: str) -> list[list[Any]]:
    """The rows of a risk's table: every procedure at the page's target risks.

    ``certified`` is the share of splits in which the procedure certified an early-exit
    policy ("no guarantee" for naive); ``mean exit`` is 0-based.
    """
    data: RiskResult = results.risks[risk]
    shown = {round(e, 6) for e in results.settings.shown_target_risks}
    exits = {(r.procedure, round(r.target_risk, 6)): r for r in data.evaluation_exits.rows}
    rows = []
    for r in data.evaluation.rows:
        key = (r.procedure, round(r.target_risk, 6))
        if key[1] not in shown:
            continue
        exit_row = exits.get(key)
        promise = guarantee_of(r.procedure)
        rows.append(
            [
                r.procedure,
                "no guarantee" if promise == "none" else promise,
                "no guarantee" if promise == "none" else f"{100 * r.certified_rate:.0f}%",
                r.target_risk,
                r.mean_test_risk,
                r.sd_test_risk,
                r.violation_rate,
                r.population_violation_rate,
                r.violation_p_value,
                None if exit_row is None else exit_row.mean_cost,
                _percent(r.relative_saving),
            ]
        )
    return rows


def timed_rows(results: DemoResults) -> list[list[Any]]:
    """The page's table of the one policy run for real, beside the means over splits.

    The mean exit and the FLOPs saving appear twice, labelled: on the timed split, and as
    the mean over every split of the evaluation (the summary's figures).
    """
    timed: TimedPolicy = results.timed
    over_splits = None
    if timed.risk in results.risks:
        try:
            over_splits = results.risks[timed.risk].row(timed.procedure, timed.target_risk)
        except KeyError:
            over_splits = None
    trials = results.settings.trials
    threshold = "never (the full model)" if timed.threshold is None else f"{timed.threshold:.4g}"
    rows: list[list[Any]] = [
        [
            "policy",
            (
                f"{timed.procedure} on {results.risk_title(timed.risk)}, ε = "
                f"{timed.target_risk:g}, threshold {threshold}"
            ),
        ],
        ["certified", timed.certified],
        [
            "calibrated on / run on",
            f"{_cell(timed.n_cal)} / {_cell(timed.n_test)} {timed.unit}",
        ],
        ["mean exit (0-based), this run", timed.mean_exit],
    ]
    if over_splits is not None:
        rows.append([f"mean exit (0-based), mean over {trials} splits", over_splits[1].mean_cost])
    rows.append(["FLOPs saved, this run", _percent(timed.flops_saving)])
    if over_splits is not None:
        rows.append(
            [f"FLOPs saved, mean over {trials} splits", _percent(over_splits[0].relative_saving)]
        )
    ideal = timed.flops_speedup
    rows.append(["FLOPs-ideal speed-up, this run", None if ideal is None else f"{ideal:.2f}×"])
    for speed in timed.speeds:
        if speed.predicted is not None:
            rows.append(
                [f"predicted from the latency profile at batch {speed.batch_size}",
                 f"{speed.predicted:.2f}×"]
            )
        rows.append(
            [
                f"measured at batch {speed.batch_size}",
                speed_phrase(speed.speedup, baseline=timed.baseline),
            ]
        )
        if speed.baseline is not None and speed.early is not None and speed.unit:
            rows.append(
                [
                    f"{speed.unit} at batch {speed.batch_size}: {timed.baseline} / early exit",
                    f"{speed.baseline:.4g} / {speed.early:.4g}",
                ]
            )
    rows += [[label, value] for label, value in timed.measures]
    return rows


def _names(procedures: list[str]) -> str:
    return ", ".join(f"<b>{_text(p)}</b>" for p in procedures)


def _promises(results: DemoResults) -> str:
    """What each compared procedure promises, in words (the page's guarantee paragraph)."""
    from exitguard.report.plots import procedures_of

    procedures = procedures_of(next(iter(results.risks.values())).evaluation)
    mean = [p for p in procedures if p.startswith("crc")]
    none = [p for p in procedures if p == "naive"]
    probable = [p for p in procedures if p not in mean and p not in none]
    parts = []
    if mean:
        parts.append(
            f"{_names(mean)} {'promises' if len(mean) == 1 else 'promise'} E[risk] ≤ ε over "
            "calibration draws (the mean; any single draw may exceed ε, so its violation rate "
            "is not bounded by δ)."
        )
    if probable:
        verb = "promises" if len(probable) == 1 else "promise"
        parts.append(f"{_names(probable)} {verb} P(risk ≤ ε) ≥ 1 − δ.")
    if none:
        parts.append(f"{_names(none)} promises nothing (no guarantee).")
    return " ".join(parts)


def _summary(results: DemoResults) -> str:
    items = []
    for line in results.summary:
        slower = line.startswith("At batch ") and " slower than " in line  # its own line
        css = ' class="slower"' if slower else ""
        items.append(f"<li{css}>{_text(line)}</li>")
    return "".join(items)


def _figure(grid: PictureGrid) -> str:
    return (
        f"<h3>{_text(grid.title)}</h3>"
        f'<p class="note">{_text(grid.caption)}</p>'
        f'<img src="{_text(grid.file)}" alt="{_text(grid.title or "picture grid")}">'
    )


def _extra_table(table: Table) -> str:
    return (
        f"<h3>{_text(table.title)}</h3>"
        + _table(list(table.header), table.rows)
        + f'<p class="note">{_text(table.note)}</p>'
    )


def render_html(results: DemoResults | DriftResults | Mapping[str, Any]) -> str:
    """The report page of typed results, or of ``results.json`` content.

    Raises
    ------
    ValueError
        When the results lack a field the page needs, or a field has the wrong type.
    """
    try:
        typed = (
            results
            if isinstance(results, (DemoResults, DriftResults))
            else (results_from_dict(results))
        )
        if isinstance(typed, DriftResults):
            from exitguard.report.drift import render_drift_html

            return render_drift_html(typed)
        return _render_html(typed)
    except (KeyError, TypeError, IndexError, AttributeError) as error:
        raise ValueError(
            f"RESULTS: malformed results ({type(error).__name__}: {str(error)[:200]})."
        ) from error


def _render_html(results: DemoResults) -> str:
    settings, model, dataset, timed = (
        results.settings,
        results.model,
        results.dataset,
        results.timed,
    )
    title = _text(results.title)
    sections = "".join(
        f"<h3>{_text(data.title or risk)} (B = {data.loss_bound:g})</h3>"
        + (f'<p class="note">{_text(data.note)}</p>' if data.note else "")
        + _table(RISK_TABLE_HEADER, risk_table_rows(results, risk))
        for risk, data in results.risks.items()
    )
    accuracy = model.accuracy_per_exit or (None,) * model.n_exits
    last = model.n_exits - 1
    exit_rows = [
        [f"exit {i}" + (" (full model)" if i == last else ""), flops, acc]
        for i, (flops, acc) in enumerate(zip(model.flops_per_exit, accuracy, strict=True))
    ]
    flops_label = "FLOPs to reach and decide" + (
        f" ({model.flops_unit})" if model.flops_unit else ""
    )
    pictures = "".join(_figure(grid) for grid in results.figures)
    extra_tables = "".join(_extra_table(table) for table in results.tables)
    unit = _text(dataset.unit)
    slower = "".join(
        f'<p class="slower">At batch {s.batch_size} the early-exit run was '
        f"{_text(speed_phrase(s.speedup, baseline=timed.baseline))}: the exit heads and the "
        "bookkeeping cost more there than the skipped layers save.</p>"
        for s in timed.slower
    )
    data_note = "; " + _text(dataset.note) if dataset.note else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_STYLE}</style></head>
<body>
<h1>{title}</h1>
<div class="summary"><ul>{_summary(results)}</ul></div>
<p class="convention"><b>Counting exits.</b> {_text(EXIT_CONVENTION)} This model has
L = {model.n_exits} exits: exit 0 to exit {last}.</p>
<h2>Guarantees</h2>
<p>Every procedure is calibrated on n = {settings.n_cal} samples and checked on the rest of
the held-out data, over {settings.trials} random calibration/test splits (δ =
{settings.delta:g}); the plots and tables below are <b>means over these splits</b>.
{_promises(results)} All assume calibration and deployment data are exchangeable.
A <i>test violation</i> is a split whose test risk exceeds ε; a <i>population
violation</i> compares the policy's risk on all held-out data with ε (free of the test
split's own noise); the binomial p-value tests "population violation rate ≤ δ".
<i>Certified</i> is the share of splits in which a procedure certified an early-exit policy
(otherwise it returns the full model).</p>
<h2>Test risk against the target</h2>
<p class="note">Both axes are logarithmic (the test-risk axis is linear near zero, so zero
and negative risks show), so the line risk = ε is straight; a curve below it keeps the
target on average.</p>
<img src="test_risk.png" alt="test risk against target risk">
<h2>Violations</h2>
<p class="note">The dashed δ line bounds the procedures that promise P(risk ≤ ε) ≥ 1 − δ
only. The curves of those that promise the mean risk (crc) are not bounded by δ, and naive
promises nothing.</p>
<img src="violations.png" alt="violation rate against target risk">
<h2>Efficiency</h2>
<p class="note">Mean exit (0-based) and share of the full model's FLOPs saved by each
procedure's policy, mean over the {settings.trials} splits.</p>
<img src="efficiency.png" alt="mean exit and FLOPs saving against target risk">
<h2>One policy run for real</h2>
<p>The figures above are means over {settings.trials} splits. Here <b>one</b> policy,
calibrated on one split, ran with real skipping on that split's test {unit} and was timed
side by side with {_text(timed.baseline)}. Its mean exit and FLOPs saving are shown for this
run and, for comparison, as the mean over all splits (the summary's figures).</p>
{slower}
{_table(["measure", "value"], timed_rows(results))}
<img src="exit_histogram.png" alt="histogram of exits taken">
{"<h2>Pictures</h2>" + pictures if pictures else ""}
<h2>Tables</h2>{extra_tables}{sections}
<h2>Model and data</h2>
<p>{_text(model.description)}</p>
{_table(["exit", flops_label, model.accuracy_label], exit_rows)}
<p class="note">Dataset: {_text(dataset.name)} ({_text(dataset.source)}); {_cell(dataset.n_train)}
training and {_cell(dataset.n_heldout)} held-out {unit}{data_note}.
Created {_text(results.created)} with exitguard {_text(results.exitguard_version)}.</p>
<p class="note">Machine: {_text(results.machine.describe())}.</p>
</body></html>
"""


def _json_text(data: Mapping[str, Any]) -> str:
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def _finite_or_null(value: Any) -> Any:
    """``value`` with NaN and infinities as None: strict JSON, which :func:`load_results` reads."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


def page_files(results: DemoResults | DriftResults | Mapping[str, Any]) -> dict[str, bytes]:
    """Every page file of a report (``results.json``, pictures, ``index.html``) as bytes.

    Typed results are stored as their ``to_dict()``; ``results.json`` content is checked,
    then stored as given (NaN and infinities as null). Everything is drawn in memory.
    """
    if isinstance(results, (DemoResults, DriftResults)):
        typed, stored = results, results.to_dict()
    else:
        if not isinstance(results, Mapping):
            raise ValueError(f"RESULTS: must be a JSON object; got {type(results).__name__}.")
        if results.get("task") != "drift":
            check_figures(results)  # names and sizes, before anything is converted or drawn
        stored = _finite_or_null(results)
        try:
            typed = results_from_dict(stored)
        except (KeyError, TypeError, IndexError, AttributeError) as error:
            raise ValueError(
                f"RESULTS: malformed results ({type(error).__name__}: {str(error)[:200]})."
            ) from error
    page = render_html(typed)
    text = _json_text(stored).encode("utf-8")
    if isinstance(typed, DriftResults):
        from exitguard.report.drift import render_drift_plots

        pictures = render_drift_plots(typed)
    else:
        pictures = render_plots(typed)  # (name -> PNG bytes), all drawn before any write
    return {"results.json": text, **pictures, "index.html": page.encode("utf-8")}


def write_report(
    results: DemoResults | DriftResults | Mapping[str, Any],
    folder: str | os.PathLike[str],
    *,
    data: Mapping[str, Writer] | None = None,
) -> Path:
    """Write a report folder: ``results.json``, the PNG plots, ``index.html`` (and ``data``).

    Everything is checked and drawn in memory first; malformed results, a picture grid over
    the size limits, or an existing link or special file at any of the report's file names
    is refused before anything is written. The files are written into a fresh folder that
    then replaces the earlier report, so no file of an earlier run is left behind; files
    that exitguard did not write are never deleted (see :mod:`exitguard.report.folder`).

    Parameters
    ----------
    results : DemoResults, DriftResults or mapping
        Typed results, or ``results.json`` content.
    folder : path
        The report folder.
    data : mapping of file name -> bytes or writer, optional
        Data files to write beside the page (loss tables, per-exit outputs, the policy). By
        default the earlier report's data files are kept.

    Returns
    -------
    Path
        The page, ``folder / "index.html"``.

    Raises
    ------
    ValueError
        Malformed results, or a picture grid or plot over the limits.
    exitguard.FileSafetyError
        ``folder`` exists and is not a folder (a device, a FIFO, a file), or a report file
        name there is a link or a special file.
    """
    files = page_files(results)
    target = publish(folder, files, data)
    return target / "index.html"


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a results.json written by a demo, checking its schema; the content as a dict.

    Files over 256 MiB, nested deeper than 32 levels, with duplicate keys or NaN, or that are
    not regular files are refused before they are parsed. See :func:`read_results` for the
    typed results.
    """
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"RESULTS: no such file: {source}")
    try:
        data = load_json(
            source, max_bytes=_MAX_RESULTS_BYTES, max_depth=_MAX_RESULTS_DEPTH, argument="RESULTS"
        )
    except ValueError as error:
        if type(error).__name__ == "FileSafetyError":
            raise
        raise ValueError(f"RESULTS: {source} is not valid JSON ({error})") from error
    if not isinstance(data, dict) or data.get("schema") != RESULTS_SCHEMA:
        raise ValueError(
            f"RESULTS: {source} is not an exitguard demo result (schema must be "
            f"{RESULTS_SCHEMA!r})."
        )
    version = data.get("schema_version", 1)
    if version not in (1, SCHEMA_VERSION):
        raise ValueError(
            f"RESULTS: {source} has schema version {version!r}; this exitguard reads versions "
            f"1 and {SCHEMA_VERSION}."
        )
    return data


def read_results(path: str | os.PathLike[str]) -> DemoResults | DriftResults:
    """The typed results of a ``results.json`` (any task, schema version 1 or 2)."""
    return results_from_dict(load_results(path))


def rebuild_report(
    path: str | os.PathLike[str], *, out: str | os.PathLike[str] | None = None
) -> Path:
    """Rebuild a report folder from its ``results.json`` (into ``out``, default beside it).

    The page, its pictures and ``results.json`` are written again; rebuilt in its own
    folder, the report keeps the data files its run wrote (tables, outputs, the policy).
    """
    results = load_results(path)
    folder = Path(out) if out is not None else Path(path).parent
    return write_report(results, folder)


__all__ += ["PLOTS"]
