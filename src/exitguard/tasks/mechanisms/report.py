"""The mechanisms demo's page: the comparison table, saving against epsilon, and the curves.

Each plot function draws one risk's panel on a given matplotlib axis and returns it, so tests
can read the plotted data; :func:`write_mechanism_report` lays them out and writes
``results.json``, the PNGs and ``index.html`` into a folder (each file atomically).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from exitguard._files import atomic_save, atomic_write_text

COLOURS = {
    "branch exits": "#1f77b4",
    "cascade": "#ff7f0e",
    "learned halting": "#2ca02c",
    "anytime": "#9467bd",
    "layer skipping": "#d62728",
}
FIGURES = ("saving_vs_eps.png", "tradeoff.png", "anytime.png", "violations.png")


def _pyplot() -> Any:
    from exitguard.report.plots import _pyplot as pyplot

    return pyplot()


def _colour(name: str) -> str:
    return COLOURS.get(name, "#555555")


def plot_saving_vs_target(ax: Any, results: Mapping[str, Any], risk: str) -> Any:
    """Mean FLOPs saved over the splits against epsilon, one line per mechanism."""
    procedure = results["settings"]["procedure"]
    for name, by_risk in results["evaluations"].items():
        rows = sorted(
            (r for r in by_risk[risk]["rows"] if r["procedure"] == procedure),
            key=lambda r: r["target_risk"],
        )
        eps = [r["target_risk"] for r in rows]
        saving = [100 * (r["relative_saving"] or 0.0) for r in rows]
        ax.plot(eps, saving, "o-", ms=3, color=_colour(name), label=name)
    ax.set_xlabel("target risk ε")
    ax.set_ylabel("FLOPs saved (%)")
    settings = results["settings"]
    ax.set_title(
        f"{risk}: {procedure}, δ = {settings['delta']:g}, n = {settings['n_cal']}", fontsize=9
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return ax


def plot_tradeoff(ax: Any, results: Mapping[str, Any], risk: str) -> Any:
    """Every configuration of every mechanism: its risk on all held-out data against its FLOPs."""
    for name, data in results["tradeoffs"].items():
        ax.plot(
            data["flops_fraction"],
            data["risk"][risk],
            ".-",
            ms=3,
            lw=0.8,
            color=_colour(name),
            label=name,
        )
    ax.axhline(results["settings"]["target_risk"], color="black", ls="--", lw=1, label="ε")
    ax.set_xlabel("FLOPs (fraction of the mechanism's full model)")
    ax.set_ylabel(f"{risk} (held-out mean)")
    ax.set_title(f"{risk}: every configuration (row 0 = full model at 1)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return ax


def plot_anytime(ax: Any, results: Mapping[str, Any], risk: str) -> Any:
    """Anytime prediction: each budget's calibration risk, its upper bound, and its test risk."""
    curve = results["anytime_curves"][risk]
    budget = np.asarray(curve["budget"]) / curve["budget"][-1]
    ax.plot(budget, curve["upper_bound"], "v-", color="#d62728", ms=4, label="upper bound")
    ax.plot(budget, curve["empirical_risk"], "o-", color="#1f77b4", ms=4, label="calibration")
    ax.plot(budget, curve["test_risk"], "s:", color="#2ca02c", ms=4, label="test")
    eps = results["settings"]["target_risk"]
    ax.axhline(eps, color="black", ls="--", lw=1, label=f"ε = {eps:g}")
    smallest = curve["smallest_certified_budget"] / curve["budget"][-1]
    ax.axvline(smallest, color="#9467bd", ls=":", lw=1.2, label="smallest certified budget")
    ax.set_xlabel("budget (fraction of the full model's FLOPs)")
    ax.set_ylabel(risk)
    ax.set_title(
        f"{risk}: bounds hold together w.p. >= {1 - curve['delta']:g} ({curve['bound']})",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return ax


def plot_violations(ax: Any, results: Mapping[str, Any], risk: str) -> Any:
    """Population violation rate at the demo's epsilon, per mechanism and procedure."""
    eps = results["settings"]["target_risk"]
    procedures = [p for p in results["settings"]["procedures"] if p != "crc"]
    names = list(results["evaluations"])
    width = 0.8 / max(1, len(procedures))
    for j, procedure in enumerate(procedures):
        rates = []
        for name in names:
            row = next(
                r
                for r in results["evaluations"][name][risk]["rows"]
                if r["procedure"] == procedure and math.isclose(r["target_risk"], eps)
            )
            rates.append(row["population_violation_rate"])
        ax.bar(np.arange(len(names)) + j * width, rates, width, label=procedure)
    ax.axhline(results["settings"]["delta"], color="black", ls="--", lw=1, label="δ")
    ax.set_xticks(np.arange(len(names)) + width * (len(procedures) - 1) / 2)
    ax.set_xticklabels(names, rotation=20, fontsize=7)
    ax.set_ylabel("violation rate over splits")
    ax.set_title(f"{risk} at ε = {eps:g}", fontsize=9)
    ax.legend(fontsize=7)
    return ax


def _draw(results: Mapping[str, Any], folder: Path) -> list[str]:
    plt = _pyplot()
    risks = results["settings"]["risks"]
    names = []
    for name, function in zip(
        FIGURES, (plot_saving_vs_target, plot_tradeoff, plot_anytime, plot_violations), strict=True
    ):
        figure, axes = plt.subplots(1, len(risks), figsize=(5.2 * len(risks), 3.8), squeeze=False)
        for ax, risk in zip(axes[0], risks, strict=True):  # one panel per risk
            function(ax, results, risk)
        figure.tight_layout()
        atomic_save(
            folder / name, lambda path, figure=figure: figure.savefig(path, dpi=110, format="png")
        )
        plt.close(figure)
        names.append(name)
    return names


def _cell(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return format(value, spec)
    return html.escape(str(value))


def _percent(value: Any) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


COLUMNS = (
    "mechanism",
    "certified parameter",
    "certified risk (UCB)",
    "test risk",
    "mean test risk",
    "viol. (test)",
    "viol. (pop.)",
    "binomial p",
    "FLOPs saved",
    "mean FLOPs saved",
    "speed-up b=1",
    "speed-up b=256",
    "real = sim.",
)


def comparison_rows(rows: Sequence[Mapping[str, Any]], risk: str) -> list[list[str]]:
    """The comparison table of one risk as text cells (the page's and the benchmark's)."""
    table = []
    for r in rows:
        if r["risk"] != risk:
            continue
        value = "full model" if not r["certified"] else f"{r['parameter']} = {_cell(r['value'])}"
        table.append(
            [
                html.escape(r["mechanism"]),
                html.escape(value),
                _cell(r["certified_risk"]),
                _cell(r["test_risk"]),
                _cell(r["mean_test_risk"]),
                _cell(r["violation_rate"], ".2f"),
                _cell(r["population_violation_rate"], ".2f"),
                _cell(r["violation_p_value"], ".3g"),
                _percent(r["flops_saved"]),
                _percent(r["mean_flops_saved"]),
                _cell(r["speedup_batch_1"], ".2f"),
                _cell(r["speedup_batch_256"], ".2f"),
                _cell(r["real_equals_simulated"]),
            ]
        )
    return table


def _html_table(header: Sequence[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


TRAIT_HEADER = (
    "mechanism",
    "what it needs",
    "cost of a sample that never stops early",
    "certified by",
)
TRAITS = (
    (
        "branch exits",
        "exit heads on one network",
        "the backbone and every head on the way",
        "any procedure",
    ),
    (
        "cascade",
        "separately trained models of growing cost",
        "every model: more than the last model alone",
        "any procedure",
    ),
    (
        "learned halting",
        "halting units trained on the frozen network (ponder cost)",
        "the backbone, every head and halting unit on the way",
        "any procedure",
    ),
    (
        "anytime",
        "exit heads; a budget in FLOPs or ms instead of a confidence",
        "nothing beyond the budget (fixed depth per budget)",
        "any procedure; every budget at once by the risk curve",
    ),
    (
        "layer skipping",
        "gates trained with the network (compute penalty)",
        "every block and gate",
        "fixed-sequence testing (UCB, LTT) or CRC: the risk need not be monotone",
    ),
)


def render_mechanism_html(results: Mapping[str, Any]) -> str:
    """The page for a results dict of :func:`exitguard.tasks.mechanisms.run_demo`."""
    escape = html.escape
    settings, dataset, models = results["settings"], results["dataset"], results["models"]
    summary = "".join(f"<li>{escape(str(line))}</li>" for line in results["summary"])
    tables = "".join(
        f"<h3>{escape(risk)}</h3>"
        + _html_table(COLUMNS, comparison_rows(results["comparison"], risk))
        for risk in settings["risks"]
    )
    flops = models["flops"]
    accuracy = ", ".join(f"{a:.3f}" for a in models["classifier accuracy per exit"])
    cascade = ", ".join(f"{a:.3f}" for a in models["cascade accuracy per model"])
    machine = results.get("machine", {})
    eps, delta, n = settings["target_risk"], settings["delta"], settings["n_cal"]
    traits = _html_table(TRAIT_HEADER, [[escape(c) for c in row] for row in TRAITS])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{escape(str(results.get("title", "")))}</title>
<style>body {{ font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto;
padding: 0 1em; color: #222; line-height: 1.45; }} table {{ border-collapse: collapse;
font-size: 0.85em; }} th, td {{ border-bottom: 1px solid #ddd; padding: 0.2em 0.6em;
text-align: right; }} th:first-child, td:first-child {{ text-align: left; }}
img {{ max-width: 100%; }} .summary {{ background: #f4f7fb; border-left: 4px solid #1f77b4;
padding: 0.6em 1em; }} .note {{ color: #555; font-size: 0.9em; }}</style></head><body>
<h1>{escape(str(results.get("title", "")))}</h1>
<ul class="summary">{summary}</ul>
<p>Five ways to spend less compute on easy inputs, each a family of configurations ordered
from the full model, each certified by the same risk core at ε = {eps:g}, δ = {delta:g}
with n = {n} calibration samples ({escape(settings["procedure"])}: P(risk &gt; ε) &le; δ
over calibration sets, for exchangeable data). Risks are against each mechanism's own full
model: branch exits, cascade, learned halting and anytime share the same multi-exit CNN as
reference; layer skipping has its own residual network (accuracy with every block
{models["skip network accuracy (every block)"]:.3f}).</p>
<h2>Comparison at ε = {eps:g}</h2>{tables}
<p class="note"><b>certified risk</b>: the upper confidence bound of the configuration
certified on one calibration split; <b>test risk</b>, <b>FLOPs saved</b>: that configuration
on the {dataset["n_test"]} other held-out samples; <b>mean</b> and <b>viol.</b> columns:
over {settings["trials"]} random splits (test: share of splits whose test risk exceeds ε;
pop.: the same for the risk on all held-out data; binomial p: one-sided test of "violation
rate &le; δ"); <b>speed-up</b>: measured wall time of the full model over the certified
configuration, run for real side by side (batch 1 on a subset); <b>real = sim.</b>: the real
run's decisions and predictions equal the full-pass simulation's at batch 1 and 256.
Layer skipping refuses procedures that assume a risk monotone in the gate threshold
(crc-marginal); UCB and LTT test its configurations in a fixed sequence from the full model,
and CRC runs on monotonised losses.</p>
<h2>Choosing a mechanism</h2>{traits}
<h2>FLOPs saved against ε</h2><img src="saving_vs_eps.png" alt="saving against epsilon">
<h2>Every configuration: risk against compute</h2><img src="tradeoff.png" alt="tradeoff">
<h2>Anytime prediction: the certified per-budget risk</h2>
<img src="anytime.png" alt="anytime risk curve">
<h2>Violation rates</h2><img src="violations.png" alt="violation rates">
<h2>Models and data</h2>
<p>Multi-exit CNN accuracy per exit: {accuracy}. Cascade accuracy per model: {cascade}
(the last is the CNN run to its last exit). FLOPs of the full models: branch exits
{flops["branch exits"]["full"]:,}, cascade (last model alone)
{flops["cascade"]["full"]:,}, layer skipping {flops["layer skipping"]["full"]:,}.</p>
<p class="note">Dataset: {escape(str(dataset["name"]))} ({escape(str(dataset["source"]))});
{dataset["n_train"]} training and {dataset["n_heldout"]} held-out images. Machine: Python
{escape(str(machine.get("python", "")))}, torch {escape(str(machine.get("torch", "")))},
{escape(str(machine.get("threads", "")))} threads. Created
{escape(str(results.get("created", "")))}.</p>
</body></html>
"""


def write_mechanism_report(results: Mapping[str, Any], folder: Path) -> Path:
    """Write ``results.json``, the plots and ``index.html`` of the mechanisms demo."""
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, allow_nan=False) + "\n"
    page = render_mechanism_html(results)
    atomic_write_text(folder / "results.json", text)
    _draw(results, folder)
    return atomic_write_text(folder / "index.html", page)
