"""Plots of a demo's results (matplotlib, headless). Each function draws from results.json data."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PROCEDURE_STYLE = {
    "naive": {"color": "#9e9e9e", "linestyle": ":", "marker": "."},
    "crc": {"color": "#1f77b4", "linestyle": "-", "marker": "o"},
    "ucb-wsr": {"color": "#d62728", "linestyle": "--", "marker": "s"},
    "ucb-hb": {"color": "#ff7f0e", "linestyle": "--", "marker": "^"},
    "ucb-hoeffding": {"color": "#8c564b", "linestyle": "--", "marker": "v"},
    "ucb-binomial": {"color": "#e377c2", "linestyle": "--", "marker": "D"},
    "ltt": {"color": "#2ca02c", "linestyle": "-.", "marker": "x"},
    "ltt-bonferroni": {"color": "#17becf", "linestyle": "-.", "marker": "+"},
}

RISK_TITLES = {
    "prediction_gap": "prediction gap (0-1)",
    "prediction_consistency": "prediction consistency (0-1)",
    "distribution_gap": "distribution gap (Brier)",
    "distribution_consistency": "distribution consistency (Brier)",
}


def risk_title(results: Mapping[str, Any], risk: str) -> str:
    """The title of a risk: the results' own ``risk_titles`` first, then the defaults."""
    return str(results.get("risk_titles", {}).get(risk) or RISK_TITLES.get(risk, risk))


def _target_axis(axis: Any, results: Mapping[str, Any]) -> None:
    """Label the target-risk axis; log scale when the targets span more than 20x."""
    targets = [float(e) for e in results.get("settings", {}).get("target_risks", []) if e]
    if targets and max(targets) / min(targets) > 20:
        axis.set_xscale("log")
    axis.set_xlabel("target risk ε")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError('plots need matplotlib: pip install "exitguard[plot]"') from error
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _series(rows: Sequence[Mapping[str, Any]], procedure: str, key: str) -> tuple[Any, Any]:
    chosen = sorted(
        (r for r in rows if r["procedure"] == procedure), key=lambda r: r["target_risk"]
    )
    eps = np.array([r["target_risk"] for r in chosen])
    values = np.array([np.nan if r[key] is None else r[key] for r in chosen], dtype=float)
    return eps, values


def _procedures(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    seen: list[str] = []
    for row in rows:
        if row["procedure"] not in seen:
            seen.append(row["procedure"])
    return seen


def _grid(plt: Any, count: int, *, height: float = 3.2) -> tuple[Any, list[Any]]:
    columns = min(count, 4)
    rows = int(np.ceil(count / columns))
    figure, axes = plt.subplots(
        rows, columns, figsize=(4.2 * columns, height * rows), squeeze=False
    )
    flat = list(axes.ravel())
    for extra in flat[count:]:
        extra.set_visible(False)
    return figure, flat[:count]


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path


def plot_test_risk(results: Mapping[str, Any], path: Path) -> Path:
    """Mean test risk (+/- one sd over splits) against the target, with the diagonal."""
    plt = _pyplot()
    risks = results["risks"]
    figure, axes = _grid(plt, len(risks))
    for axis, (risk, data) in zip(axes, risks.items(), strict=True):
        rows = data["evaluation"]["rows"]
        eps_all = np.array([r["target_risk"] for r in rows], dtype=float)
        for procedure in _procedures(rows):
            eps, mean = _series(rows, procedure, "mean_test_risk")
            _, sd = _series(rows, procedure, "sd_test_risk")
            style = PROCEDURE_STYLE.get(procedure, {})
            axis.plot(eps, mean, label=procedure, markersize=3, **style)
            axis.fill_between(eps, mean - sd, mean + sd, color=style.get("color"), alpha=0.12)
        line = np.linspace(eps_all.min(), eps_all.max(), 50)  # a curve, straight on any scale
        axis.plot(line, line, color="black", linewidth=0.8, label="risk = target")
        axis.set_title(risk_title(results, risk))
        _target_axis(axis, results)
        axis.set_ylabel("test risk")
    axes[0].legend(fontsize=8)
    figure.suptitle("Risk control: test risk stays under the diagonal (shaded: ±1 sd over splits)")
    return _save(figure, path)


def plot_violations(results: Mapping[str, Any], path: Path) -> Path:
    """Share of calibration draws whose policy's risk exceeds the target, with delta marked."""
    plt = _pyplot()
    risks = results["risks"]
    delta = results["settings"]["delta"]
    figure, axes = _grid(plt, len(risks))
    for axis, (risk, data) in zip(axes, risks.items(), strict=True):
        rows = data["evaluation"]["rows"]
        for procedure in _procedures(rows):
            eps, rate = _series(rows, procedure, "population_violation_rate")
            axis.plot(
                eps, rate, label=procedure, markersize=3, **PROCEDURE_STYLE.get(procedure, {})
            )
        axis.axhline(delta, color="black", linewidth=0.8, linestyle="--", label=f"δ = {delta:g}")
        axis.set_ylim(-0.02, 1.02)
        axis.set_title(risk_title(results, risk))
        _target_axis(axis, results)
        axis.set_ylabel("violation rate")
    axes[0].legend(fontsize=8)
    figure.suptitle("Violations: share of calibration draws with risk > ε (on all held-out data)")
    return _save(figure, path)


def plot_efficiency(results: Mapping[str, Any], path: Path) -> Path:
    """Mean exit (top) and FLOPs saving (bottom) against the target risk."""
    plt = _pyplot()
    risks = results["risks"]
    n_exits = results["model"]["n_exits"]
    figure, axes = plt.subplots(2, len(risks), figsize=(4.2 * len(risks), 6.2), squeeze=False)
    for column, (risk, data) in enumerate(risks.items()):
        exits_rows = data["evaluation_exits"]["rows"]
        flops_rows = data["evaluation"]["rows"]
        for procedure in _procedures(flops_rows):
            style = PROCEDURE_STYLE.get(procedure, {})
            eps, mean_exit = _series(exits_rows, procedure, "mean_cost")
            axes[0, column].plot(eps, mean_exit, label=procedure, markersize=3, **style)
            eps, saving = _series(flops_rows, procedure, "relative_saving")
            axes[1, column].plot(eps, 100 * saving, label=procedure, markersize=3, **style)
        axes[0, column].set_title(risk_title(results, risk))
        axes[0, column].set_ylim(0.8, n_exits + 0.2)
        axes[0, column].set_ylabel("mean exit (1 = first)")
        axes[1, column].set_ylabel("FLOPs saved (%)")
        _target_axis(axes[0, column], results)
        _target_axis(axes[1, column], results)
    axes[0, 0].legend(fontsize=8)
    figure.suptitle("Efficiency: how early the certified policies exit")
    return _save(figure, path)


def plot_exit_histogram(results: Mapping[str, Any], path: Path) -> Path:
    """Exits taken on the test split by the timed policy."""
    plt = _pyplot()
    histogram = results["exit_histogram"]
    counts = np.asarray(histogram["counts"], dtype=float)
    exits = np.arange(1, len(counts) + 1)
    figure, axis = plt.subplots(figsize=(6, 3.4))
    axis.bar(exits, counts / max(counts.sum(), 1), color="#d62728", alpha=0.8)
    axis.set_xticks(exits)
    axis.set_xlabel("exit (the last one is the full model)")
    axis.set_ylabel(f"share of {histogram.get('unit', 'test samples')}")
    axis.set_title(
        f"{histogram['procedure']} at ε = {histogram['target_risk']:g} on "
        f"{risk_title(results, histogram['risk'])}"
    )
    return _save(figure, path)


def _figure_file(spec: Mapping[str, Any]) -> str:
    """The checked file name of a picture grid: a plain ``*.png`` name, no folders."""
    name = str(spec.get("file", ""))
    if (
        not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*\.png", name)
        or name in PLOTS
        or name == "index.html"
    ):
        raise ValueError(
            "a figure's `file` must be a plain PNG file name (letters, digits, '_', '.', '-') "
            f"other than the report's own plots {sorted(PLOTS)}; got {name!r}."
        )
    return name


def plot_picture_grid(spec: Mapping[str, Any], path: Path) -> Path:
    """A grid of images: one row per example, one column per variant.

    ``spec`` holds ``columns`` (titles), ``rows`` (each ``{"label", "cells"}``, one cell per
    column: ``{"image": H x W nested list, "cmap", "vmin", "vmax"}``), optional ``title`` and
    ``colorbar`` (a label; drawn for the last column's colour scale).
    """
    plt = _pyplot()
    columns = list(spec["columns"])
    rows = list(spec["rows"])
    if not rows or not columns:
        raise ValueError("a picture grid needs at least one row and one column.")
    first = np.asarray(rows[0]["cells"][0]["image"], dtype=float)
    aspect = first.shape[1] / max(first.shape[0], 1)
    cell_height = 1.7 if aspect < 3 else 0.9
    width = min(2.0 * aspect, 9.0) if aspect >= 3 else 1.7
    figure, axes = plt.subplots(
        len(rows),
        len(columns),
        figsize=(width * len(columns) + 0.8, cell_height * len(rows) + 0.6),
        squeeze=False,
    )
    shown = None
    for r, row in enumerate(rows):
        cells = list(row["cells"])
        if len(cells) != len(columns):
            raise ValueError(
                f"row {r} of figure {spec.get('file')!r} has {len(cells)} cells for "
                f"{len(columns)} columns."
            )
        for c, cell in enumerate(cells):
            axis = axes[r, c]
            image = np.asarray(cell["image"], dtype=float)  # (H, W)
            shown = axis.imshow(
                image,
                cmap=cell.get("cmap", "gray"),
                vmin=cell.get("vmin"),
                vmax=cell.get("vmax"),
                interpolation="nearest",
                aspect="auto" if aspect >= 3 else "equal",
            )
            axis.set_xticks([])
            axis.set_yticks([])
            if r == 0:
                axis.set_title(str(columns[c]), fontsize=8)
            if c == 0:
                axis.set_ylabel(str(row.get("label", "")), fontsize=8)
    if spec.get("title"):
        figure.suptitle(str(spec["title"]), fontsize=10)
    figure.tight_layout()
    if spec.get("colorbar") and shown is not None:
        figure.colorbar(shown, ax=list(axes.ravel()), shrink=0.8, label=str(spec["colorbar"]))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


PLOTS = {
    "test_risk.png": plot_test_risk,
    "violations.png": plot_violations,
    "efficiency.png": plot_efficiency,
    "exit_histogram.png": plot_exit_histogram,
}


def check_figures(results: Mapping[str, Any]) -> None:
    """Raise ValueError when a picture grid's file name is not a plain, free PNG name."""
    names = [_figure_file(spec) for spec in results.get("figures", [])]
    if len(set(names)) != len(names):
        raise ValueError(f"figure file names must be distinct; got {names}.")


def draw_all(results: Mapping[str, Any], folder: Path) -> list[Path]:
    """Draw every plot and picture grid into ``folder``; returns the files written."""
    written = [draw(results, folder / name) for name, draw in PLOTS.items()]
    for spec in results.get("figures", []):
        written.append(plot_picture_grid(spec, folder / _figure_file(spec)))
    return written
