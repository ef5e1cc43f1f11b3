"""The drift demo's page: daily risk, the monitor's statistics, fallback and recalibration.

Each plot function draws on a given matplotlib axis and returns it, so tests can read the
plotted data; :func:`write_drift_report` lays them out and writes the folder atomically.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from exitguard._files import atomic_save, atomic_write_text


def _pyplot() -> Any:
    from exitguard.report.plots import _pyplot as pyplot

    return pyplot()


def _fallback_spans(days: list[Mapping[str, Any]]) -> list[tuple[float, float]]:
    """Day ranges served by the full model, as (start, end) for shading."""
    spans, start = [], None
    for day in days:
        if day["served"] == "full model" and start is None:
            start = day["day"] - 0.5
        elif day["served"] != "full model" and start is not None:
            spans.append((start, day["day"] - 0.5))
            start = None
    if start is not None:
        spans.append((start, days[-1]["day"] + 0.5))
    return spans


def plot_daily_risk(ax: Any, results: Mapping[str, Any]) -> Any:
    """True daily risk of the served policy and of the original one, with the target."""
    days = results["days"]
    x = [d["day"] for d in days]
    eps = results["settings"]["target_risk"]
    ax.plot(
        x,
        [d["risk_original"] for d in days],
        "o-",
        color="#d62728",
        ms=3,
        label="original policy (had it stayed)",
    )
    ax.plot(
        x,
        [d["risk_served"] for d in days],
        "s-",
        color="#1f77b4",
        ms=3,
        label="served (policy, full model, recalibrated)",
    )
    ax.axhline(eps, color="black", lw=1, ls="--", label=f"target ε = {eps:g}")
    for start, end in _fallback_spans(days):
        ax.axvspan(start, end, color="#999999", alpha=0.25, lw=0)
    for event in results["events"]:
        ax.axvline(
            event["day"],
            color="#2ca02c" if event["event"] == "recalibrated" else "#ff7f0e",
            lw=1.2,
            ls=":",
        )
    twin = ax.twinx()
    twin.fill_between(x, [d["severity"] for d in days], step="mid", color="#9467bd", alpha=0.12)
    twin.set_ylabel("corruption severity", color="#9467bd")
    twin.set_ylim(0, 1)
    ax.set_xlabel("day")
    ax.set_ylabel("risk: disagreement with the full model")
    ax.set_title("Daily risk (shaded: served by the full model)")
    ax.legend(fontsize=7, loc="upper left")
    return ax


def plot_monitor(ax: Any, results: Mapping[str, Any]) -> Any:
    """The monitor's e-process and change detector per audit, with their alarm lines."""
    settings = results["settings"]
    offset = 0
    for number, segment in enumerate(results["segments"]):
        if not segment.get("audits"):
            continue
        audits = np.arange(offset + 1, offset + segment["audits"] + 1)
        first = number == 0
        if not first:
            ax.axvline(
                offset + 0.5,
                color="#2ca02c",
                ls=":",
                lw=1.2,
                label="monitor restarted on the recalibrated policy",
            )
        ax.plot(
            audits,
            segment["log10_wealth"],
            color="#1f77b4",
            lw=1,
            label="e-process log10 wealth" if first else None,
        )
        ax.plot(
            audits,
            segment["log10_detector"],
            color="#ff7f0e",
            lw=1,
            label="e-CUSUM log10 statistic" if first else None,
        )
        offset += segment["audits"]
    ax.axhline(
        math.log10(1 / settings["alpha"]),
        color="#1f77b4",
        ls="--",
        lw=1,
        label=f"e-process alarm: 1/α = {1 / settings['alpha']:g}",
    )
    ax.axhline(
        math.log10(settings["arl"]),
        color="#ff7f0e",
        ls="--",
        lw=1,
        label=f"detector alarm: ARL {settings['arl']:g} audits",
    )
    ax.set_xlabel("audited sample (of the watched policies, in order)")
    ax.set_ylabel("log10 statistic")
    ax.set_title("Anytime-valid monitor")
    ax.legend(fontsize=7, loc="upper left")
    return ax


def plot_saving(ax: Any, results: Mapping[str, Any]) -> Any:
    """Share of FLOPs saved per day by what was served."""
    days = results["days"]
    ax.bar([d["day"] for d in days], [100 * d["flops_saved"] for d in days], color="#2ca02c")
    ax.set_xlabel("day")
    ax.set_ylabel("FLOPs saved (%)")
    ax.set_title("Compute saved by the served policy")
    return ax


def draw(results: Mapping[str, Any], folder: Path) -> list[str]:
    plt = _pyplot()
    names = []
    for name, function, size in (
        ("drift_risk.png", plot_daily_risk, (9, 3.6)),
        ("drift_monitor.png", plot_monitor, (9, 3.4)),
        ("drift_saving.png", plot_saving, (9, 2.6)),
    ):
        figure, ax = plt.subplots(figsize=size)
        function(ax, results)
        figure.tight_layout()
        atomic_save(
            folder / name, lambda path, figure=figure: figure.savefig(path, dpi=110, format="png")
        )
        plt.close(figure)
        names.append(name)
    return names


def render_drift_html(results: Mapping[str, Any]) -> str:
    escape = html.escape
    summary = "".join(f"<li>{escape(str(line))}</li>" for line in results["summary"])
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{escape(str(v))}</td>"
            for v in (
                d["day"],
                f"{d['severity']:.2f}",
                d["served"],
                "–" if d["threshold"] is None else f"{d['threshold']:.3g}",
                f"{d['risk_served']:.4f}",
                f"{d['risk_original']:.4f}",
                f"{100 * d['flops_saved']:.1f}%",
                d["audits"],
                f"{d['accuracy_full_model']:.3f}",
            )
        )
        + "</tr>"
        for d in results["days"]
    )
    header = "".join(
        f"<th>{escape(h)}</th>"
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
    machine = results.get("machine", {})
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{escape(str(results.get("title", "")))}</title>
<style>body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto;
padding: 0 1em; color: #222; }} table {{ border-collapse: collapse; font-size: 0.85em; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 0.2em 0.6em; text-align: right; }}
img {{ max-width: 100%; }} .summary {{ background: #f4f7fb; border-left: 4px solid #1f77b4;
padding: 0.6em 1em; }}</style></head><body>
<h1>{escape(str(results.get("title", "")))}</h1>
<ul class="summary">{summary}</ul>
<p>The monitor reads only the audited samples' losses (disagreement with the full model, no
labels needed). Its e-process alarms with probability at most α = {results["settings"]["alpha"]:g}
over the whole stream if the policy's risk never exceeds ε; its change detector (e-CUSUM) has
an average run length of at least {results["settings"]["arl"]:g} audits without a change. After
an alarm the full model is served until a policy certified on the most recent
{results["recalibration_window"]} audits takes over (at least {results["samples_needed"]} are
needed to certify anything at this ε and δ). Days are 0-based.</p>
<img src="drift_risk.png" alt="daily risk">
<img src="drift_monitor.png" alt="monitor statistics">
<img src="drift_saving.png" alt="FLOPs saved per day">
<h2>Days</h2><table><thead><tr>{header}</tr></thead><tbody>{rows}</tbody></table>
<p>Machine: Python {escape(str(machine.get("python", "")))}, torch
{escape(str(machine.get("torch", "")))}, {escape(str(machine.get("threads", "")))} threads.</p>
</body></html>
"""


def write_drift_report(results: Mapping[str, Any], folder: Path) -> Path:
    """Write ``results.json``, the plots and ``index.html`` of the drift demo into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        folder / "results.json", json.dumps(results, indent=2, allow_nan=False) + "\n"
    )
    draw(results, folder)
    return atomic_write_text(folder / "index.html", render_drift_html(results))
