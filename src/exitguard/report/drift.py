"""The drift demo's page: daily risk, the monitor's statistics, fallback and recalibration.

Each plot function draws on a given matplotlib axis and returns it
(``plot_daily_risk(ax, results) -> ax``), so tests can read the plotted data;
:func:`render_drift_plots` lays them out and :func:`write_drift_report` writes the folder
(a fresh folder swapped into place, see :mod:`exitguard.report.folder`).
"""

from __future__ import annotations

import html
import io
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from exitguard.report.results import EXIT_CONVENTION, DriftDay, DriftResults

DRIFT_PLOTS = ("drift_risk.png", "drift_monitor.png", "drift_saving.png")


def _pyplot() -> Any:
    from exitguard.report.plots import _pyplot as pyplot

    return pyplot()


def _typed(results: DriftResults | Mapping[str, Any]) -> DriftResults:
    return results if isinstance(results, DriftResults) else DriftResults.from_dict(results)


def fallback_spans(days: tuple[DriftDay, ...]) -> list[tuple[float, float]]:
    """Day ranges served by the full model, as (start, end) for shading."""
    spans, start = [], None
    for day in days:  # a loop over the days of the stream
        if day.served == "full model" and start is None:
            start = day.day - 0.5
        elif day.served != "full model" and start is not None:
            spans.append((start, day.day - 0.5))
            start = None
    if start is not None:
        spans.append((start, days[-1].day + 0.5))
    return spans


def _labelled(ax: Any, xlabel: str, ylabel: str, title: str, *, legend: str = "upper left") -> Any:
    """``ax`` with its axis labels, its title and the page's small legend (at ``legend``)."""
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=7, loc=legend)
    return ax


def plot_daily_risk(ax: Any, results: DriftResults) -> Any:
    """True daily risk of the served policy and of the original one, with the target."""
    days = results.days
    x = [d.day for d in days]
    eps = results.target_risk
    ax.plot(
        x,
        [d.risk_original for d in days],
        "o-",
        color="#d62728",
        ms=3,
        label="original policy (had it stayed)",
    )
    ax.plot(
        x,
        [d.risk_served for d in days],
        "s-",
        color="#1f77b4",
        ms=3,
        label="served (policy, full model, recalibrated)",
    )
    ax.axhline(eps, color="black", lw=1, ls="--", label=f"target ε = {eps:g}")
    for number, (start, end) in enumerate(fallback_spans(days)):
        ax.axvspan(
            start,
            end,
            color="#999999",
            alpha=0.25,
            lw=0,
            label="served by the full model" if number == 0 else None,
        )
    for kind, colour in (("alarm", "#ff7f0e"), ("recalibrated", "#2ca02c")):
        for number, event in enumerate(e for e in results.events if e.event == kind):
            ax.axvline(
                event.day,
                color=colour,
                lw=1.2,
                ls=":",
                label=f"{kind} (day {event.day})" if number == 0 else None,
            )
    twin = ax.twinx()
    twin.fill_between(x, [d.severity for d in days], step="mid", color="#9467bd", alpha=0.12)
    twin.set_ylabel("corruption severity (shaded)", color="#9467bd")
    twin.set_ylim(0, 1)
    return _labelled(
        ax,
        "day (0 = first)",
        "risk: disagreement with the full model",
        "Daily risk of the served and the original policy",
    )


def plot_monitor(ax: Any, results: DriftResults) -> Any:
    """The monitor's e-process and change detector per audit, with their alarm lines."""
    settings = results.settings
    offset = 0
    for number, segment in enumerate(results.segments):
        if not segment.audits:
            continue
        audits = np.arange(offset + 1, offset + segment.audits + 1)
        first = number == 0
        if not first:
            ax.axvline(
                offset + 0.5,
                color="#2ca02c",
                ls=":",
                lw=1.2,
                label="monitor restarted on the recalibrated policy",
            )
        for values, colour, label in (  # the two statistics
            (segment.log10_wealth, "#1f77b4", "e-process log10 wealth"),
            (segment.log10_detector, "#ff7f0e", "e-CUSUM log10 statistic"),
        ):
            ax.plot(audits, values, color=colour, lw=1, label=label if first else None)
        offset += segment.audits
    alpha, arl = float(settings["alpha"]), float(settings["arl"])
    for level, colour, label in (  # each statistic's alarm line, in its colour
        (math.log10(1 / alpha), "#1f77b4", f"e-process alarm: 1/α = {1 / alpha:g}"),
        (math.log10(arl), "#ff7f0e", f"detector alarm: ARL {arl:g} audits"),
    ):
        ax.axhline(level, color=colour, ls="--", lw=1, label=label)
    return _labelled(
        ax,
        "audited sample (of the watched policies, in order)",
        "log10 statistic",
        "Anytime-valid monitor",
    )


def plot_saving(ax: Any, results: DriftResults) -> Any:
    """Share of FLOPs saved per day by what was served."""
    days = results.days
    ax.bar(
        [d.day for d in days],
        [100 * d.flops_saved for d in days],
        color="#2ca02c",
        label="FLOPs saved by what was served",
    )
    return _labelled(
        ax,
        "day (0 = first)",
        "FLOPs saved (%)",
        "Compute saved by the served policy (0 on full-model days)",
        legend="upper right",
    )


_LAYOUT = (
    ("drift_risk.png", plot_daily_risk, (9, 3.8)),
    ("drift_monitor.png", plot_monitor, (9, 3.4)),
    ("drift_saving.png", plot_saving, (9, 2.8)),
)


def render_drift_plots(results: DriftResults | Mapping[str, Any]) -> dict[str, bytes]:
    """The drift page's plots as PNG bytes, by file name."""
    typed = _typed(results)
    plt = _pyplot()
    drawn = {}
    for name, function, size in _LAYOUT:  # the page's three plots
        figure, ax = plt.subplots(figsize=size)
        try:
            function(ax, typed)
            figure.tight_layout()
            handle = io.BytesIO()
            figure.savefig(handle, dpi=110, format="png")
            drawn[name] = handle.getvalue()
        finally:
            plt.close(figure)
    return drawn


def _text(value: Any) -> str:
    return html.escape(str(value), quote=True)


def render_drift_html(results: DriftResults | Mapping[str, Any]) -> str:
    typed = _typed(results)
    summary = "".join(f"<li>{_text(line)}</li>" for line in typed.summary)
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{_text(v)}</td>"
            for v in (
                d.day,
                f"{d.severity:.2f}",
                d.served,
                "–" if d.threshold is None else f"{d.threshold:.3g}",
                f"{d.risk_served:.4f}",
                f"{d.risk_original:.4f}",
                f"{100 * d.flops_saved:.1f}%",
                d.audits,
                f"{d.accuracy_full_model:.3f}",
            )
        )
        + "</tr>"
        for d in typed.days
    )
    header = "".join(
        f"<th>{_text(h)}</th>"
        for h in (
            "day",
            "severity",
            "served",
            "threshold",
            "risk (served)",
            "risk (original policy)",
            "FLOPs saved",
            "audits",
            "full-model accuracy",
        )
    )
    settings = typed.settings
    alpha, arl = float(settings["alpha"]), float(settings["arl"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{_text(typed.title)}</title>
<style>body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto;
padding: 0 1em; color: #222; }} table {{ border-collapse: collapse; font-size: 0.85em; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 0.2em 0.6em; text-align: right; }}
img {{ max-width: 100%; }} .summary {{ background: #f4f7fb; border-left: 4px solid #1f77b4;
padding: 0.6em 1em; }} .convention {{ background: #fbf8ef; border-left: 4px solid #c9a227;
padding: 0.4em 1em; }} .note {{ color: #555; font-size: 0.9em; }}</style></head><body>
<h1>{_text(typed.title)}</h1>
<ul class="summary">{summary}</ul>
<p class="convention"><b>Counting exits and days.</b> {_text(EXIT_CONVENTION)} Days are
counted the same way, from day 0.</p>
<p>The monitor reads only the audited samples' losses (disagreement with the full model, no
labels needed). Its e-process alarms with probability at most α = {alpha:g} over the whole
stream if the policy's risk never exceeds ε; its change detector (e-CUSUM) has an average run
length of at least {arl:g} audits without a change. After an alarm the full model is served
until a policy certified on the most recent {typed.recalibration_window} audits takes over (at
least {typed.samples_needed} are needed to certify anything at this ε and δ).</p>
<img src="drift_risk.png" alt="daily risk">
<img src="drift_monitor.png" alt="monitor statistics">
<img src="drift_saving.png" alt="FLOPs saved per day">
<h2>Days</h2><table><thead><tr>{header}</tr></thead><tbody>{rows}</tbody></table>
<p class="note">Created {_text(typed.created)} with exitguard {_text(typed.exitguard_version)}.
Machine: {_text(typed.machine.describe())}.</p>
</body></html>
"""


def write_drift_report(
    results: DriftResults | Mapping[str, Any],
    folder: str | os.PathLike[str],
    *,
    data: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``results.json``, the plots and ``index.html`` of the drift demo into ``folder``.

    The same as :func:`exitguard.report.write_report` (which dispatches here by task).
    """
    from exitguard.report import write_report

    return write_report(_typed(results), folder, data=data)
