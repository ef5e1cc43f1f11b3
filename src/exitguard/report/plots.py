"""Plots of a demo's results (matplotlib, headless). Each function draws from results.json data.

Results files are untrusted: :func:`check_figures` bounds every size that drawing depends on
(picture-grid rows, columns and pixels; the number of risks, rows and exits) before anything
is drawn, and text from the results is drawn literally (a ``$`` never starts math mode).
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from exitguard._files import atomic_save, atomic_write

MAX_GRID_ROWS = 40
"""Most rows (examples) a picture grid may have."""
MAX_GRID_COLUMNS = 16
"""Most columns (variants) a picture grid may have."""
MAX_IMAGE_SIDE = 2048
"""Longest side, in pixels, of one image of a picture grid."""
MAX_GRID_PIXELS = 1 << 24
"""Most image pixels (summed over the cells) in one picture grid."""
MAX_CANVAS_PIXELS = 60_000_000
"""Largest drawn figure, in output pixels (about 240 MB of RGBA while drawing)."""
MAX_FIGURES = 16
MAX_RISKS = 12
MAX_ROWS_PER_RISK = 10_000
MAX_EXITS = 4096
_DPI = 110

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


def _plain(text: Any) -> str:
    """Text from the results, drawn literally by matplotlib (``$`` would start math mode)."""
    return str(text).replace("$", r"\$")


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


def _save(figure: Any, path: Path | IO[bytes], *, layout: bool = True) -> Any:
    """Write ``figure`` as PNG to a file (atomically) or a binary handle, then close it."""
    import matplotlib.pyplot as plt

    try:
        if layout:
            figure.tight_layout()
        if isinstance(path, (str, Path)):
            atomic_save(path, lambda name: figure.savefig(name, dpi=_DPI, format="png"))
        else:
            figure.savefig(path, dpi=_DPI, format="png")
    finally:
        plt.close(figure)
    return path


def plot_test_risk(results: Mapping[str, Any], path: Path | IO[bytes]) -> Any:
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
            axis.plot(eps, mean, label=_plain(procedure), markersize=3, **style)
            axis.fill_between(eps, mean - sd, mean + sd, color=style.get("color"), alpha=0.12)
        line = np.linspace(eps_all.min(), eps_all.max(), 50)  # a curve, straight on any scale
        axis.plot(line, line, color="black", linewidth=0.8, label="risk = target")
        axis.set_title(_plain(risk_title(results, risk)))
        _target_axis(axis, results)
        axis.set_ylabel("test risk")
    axes[0].legend(fontsize=8)
    figure.suptitle("Risk control: test risk stays under the diagonal (shaded: ±1 sd over splits)")
    return _save(figure, path)


def plot_violations(results: Mapping[str, Any], path: Path | IO[bytes]) -> Any:
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
                eps,
                rate,
                label=_plain(procedure),
                markersize=3,
                **PROCEDURE_STYLE.get(procedure, {}),
            )
        axis.axhline(delta, color="black", linewidth=0.8, linestyle="--", label=f"δ = {delta:g}")
        axis.set_ylim(-0.02, 1.02)
        axis.set_title(_plain(risk_title(results, risk)))
        _target_axis(axis, results)
        axis.set_ylabel("violation rate")
    axes[0].legend(fontsize=8)
    figure.suptitle("Violations: share of calibration draws with risk > ε (on all held-out data)")
    return _save(figure, path)


def plot_efficiency(results: Mapping[str, Any], path: Path | IO[bytes]) -> Any:
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
            axes[0, column].plot(eps, mean_exit, label=_plain(procedure), markersize=3, **style)
            eps, saving = _series(flops_rows, procedure, "relative_saving")
            axes[1, column].plot(eps, 100 * saving, label=_plain(procedure), markersize=3, **style)
        axes[0, column].set_title(_plain(risk_title(results, risk)))
        axes[0, column].set_ylim(0.8, n_exits + 0.2)
        axes[0, column].set_ylabel("mean exit (1 = first)")
        axes[1, column].set_ylabel("FLOPs saved (%)")
        _target_axis(axes[0, column], results)
        _target_axis(axes[1, column], results)
    axes[0, 0].legend(fontsize=8)
    figure.suptitle("Efficiency: how early the certified policies exit")
    return _save(figure, path)


def plot_exit_histogram(results: Mapping[str, Any], path: Path | IO[bytes]) -> Any:
    """Exits taken on the test split by the timed policy."""
    plt = _pyplot()
    histogram = results["exit_histogram"]
    counts = np.asarray(histogram["counts"], dtype=float)
    exits = np.arange(1, len(counts) + 1)
    figure, axis = plt.subplots(figsize=(6, 3.4))
    axis.bar(exits, counts / max(counts.sum(), 1), color="#d62728", alpha=0.8)
    axis.set_xticks(exits)
    axis.set_xlabel("exit (the last one is the full model)")
    axis.set_ylabel(_plain(f"share of {histogram.get('unit', 'test samples')}"))
    axis.set_title(
        _plain(
            f"{histogram['procedure']} at ε = {float(histogram['target_risk']):g} on "
            f"{risk_title(results, histogram['risk'])}"
        )
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


def plot_picture_grid(spec: Mapping[str, Any], path: Path | IO[bytes]) -> Any:
    """A grid of images: one row per example, one column per variant.

    ``spec`` holds ``columns`` (titles), ``rows`` (each ``{"label", "cells"}``, one cell per
    column: ``{"image": H x W nested list, "cmap", "vmin", "vmax"}``), optional ``title`` and
    ``colorbar`` (a label; drawn for the last column's colour scale). Sizes are checked
    first (see :func:`check_picture_grid`).
    """
    images = check_picture_grid(spec)  # (rows, columns) of (H, W) arrays
    plt = _pyplot()
    columns = list(spec["columns"])
    rows = list(spec["rows"])
    width, cell_height, aspect = _grid_geometry(images[0][0])
    figure, axes = plt.subplots(
        len(rows),
        len(columns),
        figsize=(width * len(columns) + 0.8, cell_height * len(rows) + 0.6),
        squeeze=False,
    )
    shown = None
    for r, row in enumerate(rows):  # a loop over a capped grid: one axis per cell
        for c, cell in enumerate(row["cells"]):
            axis = axes[r, c]
            shown = axis.imshow(
                images[r][c],
                cmap=cell.get("cmap", "gray"),
                vmin=cell.get("vmin"),
                vmax=cell.get("vmax"),
                interpolation="nearest",
                aspect="auto" if aspect >= 3 else "equal",
            )
            axis.set_xticks([])
            axis.set_yticks([])
            if r == 0:
                axis.set_title(_plain(columns[c]), fontsize=8)
            if c == 0:
                axis.set_ylabel(_plain(row.get("label", "")), fontsize=8)
    if spec.get("title"):
        figure.suptitle(_plain(spec["title"]), fontsize=10)
    figure.tight_layout()
    if spec.get("colorbar") and shown is not None:
        figure.colorbar(shown, ax=list(axes.ravel()), shrink=0.8, label=_plain(spec["colorbar"]))
    return _save(figure, path, layout=False)


def _grid_geometry(first: np.ndarray) -> tuple[float, float, float]:
    """Width and height (inches) of one grid cell, and the first image's aspect ratio."""
    aspect = first.shape[1] / max(first.shape[0], 1)
    cell_height = 1.7 if aspect < 3 else 0.9
    width = min(2.0 * aspect, 9.0) if aspect >= 3 else 1.7
    return width, cell_height, aspect


def _grid_error(spec: Mapping[str, Any], text: str) -> ValueError:
    return ValueError(f"figure {str(spec.get('file'))[:60]!r}: {text}")


def check_picture_grid(spec: Mapping[str, Any]) -> list[list[np.ndarray]]:
    """The grid's images as float arrays, after checking its shape against the limits.

    At most :data:`MAX_GRID_ROWS` rows and :data:`MAX_GRID_COLUMNS` columns, every row with one
    cell per column, every image 2-D with sides up to :data:`MAX_IMAGE_SIDE`, at most
    :data:`MAX_GRID_PIXELS` image pixels in all and a drawn figure of at most
    :data:`MAX_CANVAS_PIXELS` pixels. The counts are checked before any image is converted.
    """
    columns, rows = spec.get("columns"), spec.get("rows")
    if not isinstance(columns, list) or not isinstance(rows, list):
        raise _grid_error(spec, "`columns` and `rows` must be lists.")
    if not rows or not columns:
        raise ValueError("a picture grid needs at least one row and one column.")
    if len(rows) > MAX_GRID_ROWS or len(columns) > MAX_GRID_COLUMNS:
        raise _grid_error(
            spec,
            f"a picture grid may have at most {MAX_GRID_ROWS} rows and {MAX_GRID_COLUMNS} "
            f"columns; got {len(rows)} x {len(columns)}.",
        )
    images: list[list[np.ndarray]] = []
    pixels = 0  # image pixels so far
    for r, row in enumerate(rows):  # a loop over a capped number of rows and cells
        cells = row.get("cells") if isinstance(row, Mapping) else None
        if not isinstance(cells, list):
            raise _grid_error(spec, f"row {r} must be an object with a list of `cells`.")
        if len(cells) != len(columns):
            raise ValueError(
                f"row {r} of figure {spec.get('file')!r} has {len(cells)} cells for "
                f"{len(columns)} columns."
            )
        converted = []
        for c, cell in enumerate(cells):
            raw = cell.get("image") if isinstance(cell, Mapping) else None
            if not isinstance(raw, list) or not raw or not isinstance(raw[0], list):
                raise _grid_error(spec, f"cell ({r}, {c}): `image` must be an H x W nested list.")
            height, width = len(raw), len(raw[0])
            if height > MAX_IMAGE_SIDE or width > MAX_IMAGE_SIDE:
                raise _grid_error(
                    spec,
                    f"cell ({r}, {c}): images may be at most {MAX_IMAGE_SIDE} pixels on a "
                    f"side; got {height} x {width}.",
                )
            pixels += height * width
            if pixels > MAX_GRID_PIXELS:
                raise _grid_error(
                    spec, f"a picture grid may hold at most {MAX_GRID_PIXELS} image pixels."
                )
            try:
                image = np.asarray(raw, dtype=float)  # (H, W)
            except (TypeError, ValueError) as error:
                raise _grid_error(
                    spec, f"cell ({r}, {c}): `image` must be an H x W array of numbers."
                ) from error
            if image.ndim != 2 or image.size == 0:
                raise _grid_error(
                    spec, f"cell ({r}, {c}): `image` must be 2-D; got shape {image.shape}."
                )
            converted.append(image)
        images.append(converted)
    cell_width, cell_height, _ = _grid_geometry(images[0][0])
    canvas = (cell_width * len(columns) + 0.8) * (cell_height * len(rows) + 0.6) * _DPI**2
    if canvas > MAX_CANVAS_PIXELS:
        raise _grid_error(
            spec,
            f"the drawn grid would have {canvas:.3g} pixels; the limit is {MAX_CANVAS_PIXELS}.",
        )
    return images


PLOTS = {
    "test_risk.png": plot_test_risk,
    "violations.png": plot_violations,
    "efficiency.png": plot_efficiency,
    "exit_histogram.png": plot_exit_histogram,
}


def figure_files(results: Mapping[str, Any]) -> list[str]:
    """The checked PNG file names of the results' picture grids, in order."""
    figures = results.get("figures", [])
    if not isinstance(figures, list):
        raise ValueError(f"RESULTS: `figures` must be a list; got {type(figures).__name__}.")
    return [_figure_file(spec if isinstance(spec, Mapping) else {}) for spec in figures]


def _count(value: Any, name: str, limit: int) -> int:
    if not isinstance(value, (list, dict)) or len(value) > limit:
        size = len(value) if isinstance(value, (list, dict)) else type(value).__name__
        raise ValueError(f"RESULTS: `{name}` must hold at most {limit} entries; got {size}.")
    return len(value)


def check_figures(results: Mapping[str, Any]) -> None:
    """Raise ValueError unless the results can be drawn within the limits.

    Picture grids: plain, distinct PNG names (see :func:`figure_files`), at most
    :data:`MAX_FIGURES` of them, each within :func:`check_picture_grid`'s limits. Plots: at
    most :data:`MAX_RISKS` risks of at most :data:`MAX_ROWS_PER_RISK` evaluation rows, and at
    most :data:`MAX_EXITS` exits.
    """
    if not isinstance(results, Mapping):
        raise ValueError(f"RESULTS: must be a JSON object; got {type(results).__name__}.")
    names = figure_files(results)
    if len(set(names)) != len(names):
        raise ValueError(f"figure file names must be distinct; got {names}.")
    _count(results.get("figures", []), "figures", MAX_FIGURES)
    for spec in results.get("figures", []):
        check_picture_grid(spec)
    risks = results.get("risks")
    if _count(risks, "risks", MAX_RISKS) == 0 or not isinstance(risks, Mapping):
        raise ValueError("RESULTS: `risks` must map at least one risk to its evaluation.")
    for risk, data in risks.items():
        for key in ("evaluation", "evaluation_exits"):
            table = data.get(key) if isinstance(data, Mapping) else None
            rows = table.get("rows") if isinstance(table, Mapping) else None
            _count(rows, f"risks.{str(risk)[:40]}.{key}.rows", MAX_ROWS_PER_RISK)
    model = results.get("model")
    n_exits = model.get("n_exits") if isinstance(model, Mapping) else None
    if isinstance(n_exits, bool) or not isinstance(n_exits, int) or not 1 <= n_exits <= MAX_EXITS:
        raise ValueError(
            f"RESULTS: `model.n_exits` must be an integer in [1, {MAX_EXITS}]; got {n_exits!r}."
        )
    histogram = results.get("exit_histogram")
    counts = histogram.get("counts") if isinstance(histogram, Mapping) else None
    _count(counts, "exit_histogram.counts", MAX_EXITS)


def render_plots(results: Mapping[str, Any]) -> dict[str, bytes]:
    """Every plot and picture grid as PNG bytes, by file name (checked first).

    Raises ValueError for results that cannot be drawn (malformed or over the limits).
    """
    check_figures(results)
    drawn: dict[str, bytes] = {}
    jobs: list[tuple[str, Any]] = [
        (name, lambda handle, draw=draw: draw(results, handle)) for name, draw in PLOTS.items()
    ]
    jobs += [
        (name, lambda handle, spec=spec: plot_picture_grid(spec, handle))
        for name, spec in zip(figure_files(results), results.get("figures", []), strict=True)
    ]
    for name, draw in jobs:  # a loop over the report's few pictures
        handle = io.BytesIO()
        try:
            draw(handle)
        except (KeyError, TypeError, IndexError, AttributeError, ValueError) as error:
            if isinstance(error, ValueError) and str(error).startswith(("RESULTS", "figure")):
                raise
            raise ValueError(
                f"RESULTS: cannot draw {name} ({type(error).__name__}: {str(error)[:200]})."
            ) from error
        drawn[name] = handle.getvalue()
    return drawn


def draw_all(results: Mapping[str, Any], folder: Path) -> list[Path]:
    """Draw every plot and picture grid into ``folder`` (atomically); the files written."""
    return [
        atomic_write(Path(folder) / name, data, argument="out")
        for name, data in render_plots(results).items()
    ]
