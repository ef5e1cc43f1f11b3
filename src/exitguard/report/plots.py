"""Plots of a demo's results (matplotlib, headless).

Every plot function draws on a given matplotlib axis and returns it, in torchmetrics'
``_plot`` style: ``plot_test_risk(ax, results, risk) -> ax``. Tests read the plotted data
back from the axis (lines, bars, labels, legends). :func:`render_plots` lays the plots of a
report out in figures and returns them as PNG bytes.

Results files are untrusted: :func:`check_figures` bounds every size that drawing depends on
(picture-grid rows, columns and pixels; the number of risks, rows and exits) before anything
is drawn, and text from the results is drawn literally (a ``$`` never starts math mode).
"""

from __future__ import annotations

import functools
import io
import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from exitguard.report.results import (
    MAX_EXITS,
    MAX_FIGURES,
    MAX_RISKS,
    MAX_ROWS_PER_RISK,
    DemoResults,
    PictureGrid,
)

if TYPE_CHECKING:
    from exitguard.evaluation import Evaluation

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
_DPI = 110

PROCEDURE_STYLE = {
    "naive": {"color": "#9e9e9e", "linestyle": ":", "marker": "."},
    "crc": {"color": "#1f77b4", "linestyle": "-", "marker": "o"},
    "crc-marginal": {"color": "#9467bd", "linestyle": "-", "marker": "o"},
    "ucb-wsr": {"color": "#d62728", "linestyle": "--", "marker": "s"},
    "ucb-hb": {"color": "#ff7f0e", "linestyle": "--", "marker": "^"},
    "ucb-hoeffding": {"color": "#8c564b", "linestyle": "--", "marker": "v"},
    "ucb-binomial": {"color": "#e377c2", "linestyle": "--", "marker": "D"},
    "ltt": {"color": "#2ca02c", "linestyle": "-.", "marker": "x"},
    "ltt-bonferroni": {"color": "#17becf", "linestyle": "-.", "marker": "+"},
}

RISK_TITLES = {
    "prediction_gap": "prediction gap (0-1 loss against the labels)",
    "prediction_consistency": "prediction consistency (disagreement with the full model)",
    "distribution_gap": "distribution gap (Brier score against the labels)",
    "distribution_consistency": "distribution consistency (Brier score against the full model)",
}
PLOT_NAMES = ("test_risk.png", "violations.png", "efficiency.png", "exit_histogram.png")
"""The PNG files of every report (the picture grids come on top)."""


def default_risk_title(risk: str) -> str:
    """The title of one of exitguard's own risks (any other name is its own title)."""
    return RISK_TITLES.get(risk, risk)


def procedure_label(procedure: str, *, violations: bool = False) -> str:
    """A procedure's legend label, saying what it promises.

    On a violation plot CRC is marked as not bounded by δ: its promise is the mean risk.
    """
    if procedure == "naive":
        return "naive (no guarantee)"
    if procedure.startswith("crc"):
        if violations:
            return f"{procedure} (promises the mean risk; not bounded by δ)"
        return f"{procedure} (E[risk] ≤ ε)"
    return f"{procedure} (P(risk ≤ ε) ≥ 1 − δ)"


def _plain(text: Any) -> str:
    """Text from the results, drawn literally by matplotlib (``$`` would start math mode)."""
    return str(text).replace("$", r"\$")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError('plots need matplotlib: pip install "exitguard[plot]"') from error
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _series(evaluation: Evaluation, procedure: str, key: str) -> tuple[Any, Any]:
    """(target risks, values) of one procedure's rows, sorted by target risk."""
    chosen = sorted(
        (r for r in evaluation.rows if r.procedure == procedure), key=lambda r: r.target_risk
    )
    eps = np.array([r.target_risk for r in chosen], dtype=float)
    values = np.array(
        [np.nan if getattr(r, key) is None else getattr(r, key) for r in chosen], dtype=float
    )
    return eps, values


def procedures_of(evaluation: Evaluation) -> list[str]:
    """The procedures of an evaluation, in the order of its rows."""
    seen: list[str] = []
    for row in evaluation.rows:
        if row.procedure not in seen:
            seen.append(row.procedure)
    return seen


def _target_axis(ax: Any, results: DemoResults) -> None:
    """Label the target-risk axis, logarithmic (so small targets get room of their own)."""
    targets = [e for e in results.settings.target_risks if e > 0]
    if len(targets) == len(results.settings.target_risks) and len(set(targets)) > 1:
        ax.set_xscale("log")
    ax.set_xlabel("target risk ε")


def _linear_range(results: DemoResults) -> float:
    """Below this magnitude the test-risk axis is linear (so 0 and negative risks show): the
    power of ten below half the smallest target, so its ticks fall on decades."""
    targets = [e for e in results.settings.target_risks if e > 0]
    return 10.0 ** np.floor(np.log10(min(targets) / 2)) if targets else 1e-3


def _plot_procedures(
    ax: Any, evaluation: Evaluation, key: str, *, scale: float = 1.0, violations: bool = False
) -> None:
    """One line per procedure: ``key`` of its rows (times ``scale``) against the target ε."""
    for procedure in procedures_of(evaluation):
        eps, values = _series(evaluation, procedure, key)
        ax.plot(
            eps,
            scale * values,
            label=_plain(procedure_label(procedure, violations=violations)),
            markersize=3,
            **PROCEDURE_STYLE.get(procedure, {}),
        )


def _against_target(
    ax: Any, results: DemoResults, risk: str, *, ylabel: str, legend: bool, loc: str
) -> Any:
    """Title a plot against the target ε with its risk, label its axes, add the legend."""
    ax.set_title(_title(results.risk_title(risk), width=60), fontsize=10)
    _target_axis(ax, results)
    ax.set_ylabel(ylabel)
    if legend:
        ax.legend(fontsize=8, loc=loc)
    return ax


# ------------------------------------------------------------------ plots on one axis


def plot_test_risk(ax: Any, results: DemoResults, risk: str, *, legend: bool = True) -> Any:
    """Mean test risk (±1 sd over splits) of every procedure against the target ε.

    The y axis is symmetric-log (linear within ±ε_min/4, so zero and negative risks show):
    small ε stay visible. The black line is risk = ε, straight wherever both axes are
    logarithmic.
    """
    evaluation = results.risks[risk].evaluation
    for procedure in procedures_of(evaluation):
        eps, mean = _series(evaluation, procedure, "mean_test_risk")
        _, sd = _series(evaluation, procedure, "sd_test_risk")
        style = PROCEDURE_STYLE.get(procedure, {})
        ax.plot(eps, mean, label=_plain(procedure_label(procedure)), markersize=3, **style)
        ax.fill_between(eps, mean - sd, mean + sd, color=style.get("color"), alpha=0.12)
    targets = np.array(sorted(results.settings.target_risks), dtype=float)
    ax.plot(targets, targets, color="black", linewidth=0.9, label="risk = ε")
    ax.set_yscale("symlog", linthresh=_linear_range(results), linscale=0.6)
    return _against_target(
        ax, results, risk, ylabel="test risk (mean over splits)", legend=legend, loc="upper left"
    )


def plot_violations(ax: Any, results: DemoResults, risk: str, *, legend: bool = True) -> Any:
    """Share of calibration draws whose policy's risk on all held-out data exceeds ε.

    The δ line bounds the high-probability procedures only: CRC promises the mean risk
    (its curve is labelled so) and naive promises nothing.
    """
    evaluation = results.risks[risk].evaluation
    delta = results.settings.delta
    _plot_procedures(ax, evaluation, "population_violation_rate", violations=True)
    ax.axhline(delta, color="black", linewidth=0.9, linestyle="--", label=f"δ = {delta:g}")
    ax.set_ylim(-0.02, 1.02)
    return _against_target(
        ax, results, risk, ylabel="violation rate", legend=legend, loc="upper right"
    )


def plot_mean_exit(ax: Any, results: DemoResults, risk: str, *, legend: bool = True) -> Any:
    """Mean exit (0-based, mean over splits) of every procedure's policy against ε."""
    evaluation = results.risks[risk].evaluation_exits
    last = results.model.n_exits - 1
    _plot_procedures(ax, evaluation, "mean_cost")
    ax.set_ylim(-0.2, last + 0.2)
    ax.set_yticks(np.arange(last + 1) if last <= 12 else np.linspace(0, last, 7).round())
    ylabel = f"mean exit (0 = first, {last} = full model)"
    return _against_target(ax, results, risk, ylabel=ylabel, legend=legend, loc="upper right")


def plot_flops_saving(ax: Any, results: DemoResults, risk: str, *, legend: bool = True) -> Any:
    """Share of the full model's FLOPs saved (mean over splits) against ε, in percent."""
    _plot_procedures(ax, results.risks[risk].evaluation, "relative_saving", scale=100)
    return _against_target(
        ax, results, risk, ylabel="FLOPs saved (%)", legend=legend, loc="upper left"
    )


def plot_exit_histogram(ax: Any, results: DemoResults) -> Any:
    """Share of the timed samples that left at each exit, under the one policy run for real."""
    timed = results.timed
    counts = np.asarray(timed.exit_counts, dtype=float)
    exits = np.arange(len(counts))
    last = len(counts) - 1
    ax.bar(
        exits,
        counts / max(counts.sum(), 1),
        color="#d62728",
        alpha=0.8,
        label=_plain(f"{timed.procedure} at ε = {timed.target_risk:g}"),
    )
    ax.set_xticks(exits, [f"{e}" if e < last else f"{e}\n(full)" for e in exits])
    ax.set_xlabel(f"exit (0 = first, {last} = full model)")
    ax.set_ylabel(_plain(f"share of {timed.counted_unit}"))
    ax.set_title(
        _title(
            f"Exits taken by the one policy run for real: {timed.procedure} at "
            f"ε = {timed.target_risk:g} on {results.risk_title(timed.risk)}",
            width=70,
        ),
        fontsize=9,
    )
    ax.legend(fontsize=7)
    return ax


def plot_picture_grid(axes: Any, grid: PictureGrid) -> Any:
    """Draw a picture grid on a (rows, columns) array of axes; returns the axes.

    Images are drawn with their colour map and range; pictures get no ticks, maps (a grid
    with ``xticks``/``yticks``) get labelled ticks.
    """
    aspect = _grid_geometry(grid.rows[0].cells[0].image.shape)[2]
    for r, row in enumerate(grid.rows):  # a loop over a capped grid: one axis per cell
        for c, cell in enumerate(row.cells):
            ax = axes[r, c]
            ax.imshow(
                cell.image,
                cmap=cell.cmap,
                vmin=cell.vmin,
                vmax=cell.vmax,
                interpolation="nearest",
                aspect="auto" if aspect >= 3 else "equal",
            )
            if grid.xticks:
                ax.set_xticks([p for p, _ in grid.xticks], [_plain(t) for _, t in grid.xticks])
                ax.tick_params(labelsize=6)
            else:
                ax.set_xticks([])
            if grid.yticks:
                ax.set_yticks([p for p, _ in grid.yticks], [_plain(t) for _, t in grid.yticks])
                ax.tick_params(labelsize=6)
            else:
                ax.set_yticks([])
            if r == 0:
                ax.set_title(_plain(grid.columns[c]), fontsize=8)
            if c == 0:
                label = row.label + (f"\n{grid.ylabel}" if grid.ylabel else "")
                ax.set_ylabel(_plain(label), fontsize=8)
            if r == len(grid.rows) - 1 and grid.xlabel:
                ax.set_xlabel(_plain(grid.xlabel), fontsize=7)
    return axes


# ---------------------------------------------------------------------------- figures


_PANEL_WIDTH = 5.6
"""Inches per plot column: two columns fill the page at about its own scale."""


def _title(text: str, *, width: int) -> str:
    """``text`` drawn literally and wrapped at ``width`` characters."""
    return textwrap.fill(_plain(text), width=width)


def _risk_axes(plt: Any, count: int, *, height: float = 3.6) -> tuple[Any, list[Any]]:
    """One axis per risk, two per row (one when there is a single risk)."""
    columns = min(count, 2)
    rows = -(-count // columns)  # ceil
    figure, axes = plt.subplots(
        rows, columns, figsize=(_PANEL_WIDTH * columns, height * rows + 1.6), squeeze=False
    )
    flat = list(axes.ravel())
    for extra in flat[count:]:
        extra.set_visible(False)
    return figure, flat[:count]


def _figure_legend(figure: Any, ax: Any) -> int:
    """One legend for the whole figure, below the plots (the first axis has every entry);
    returns its number of rows."""
    handles, labels = ax.get_legend_handles_labels()
    columns = 2 if figure.get_figwidth() > 1.5 * _PANEL_WIDTH else 1
    figure.legend(handles, labels, loc="lower center", ncol=columns, fontsize=9, frameon=False)
    return -(-len(labels) // columns)


def _leave_room(figure: Any, *, legend_rows: int, title_lines: int) -> None:
    """Lay the axes out above the figure legend and below the (wrapped) title."""
    height = figure.get_figheight()
    bottom = (0.15 + 0.2 * legend_rows) / height
    figure.tight_layout(rect=(0, bottom, 1, 1 - (0.1 + 0.22 * title_lines) / height))


def _risk_figure(
    results: DemoResults, draw: Callable[..., Any], title: str, *, height: float = 3.6
) -> Any:
    """``draw(ax, results, risk, legend=False)`` for every risk, a legend and a title."""
    plt = _pyplot()
    figure, axes = _risk_axes(plt, len(results.risks), height=height)
    for ax, risk in zip(axes, results.risks, strict=True):
        draw(ax, results, risk, legend=False)
    legend_rows = _figure_legend(figure, axes[0])
    wrapped = _title(title, width=int(10.5 * figure.get_figwidth()))
    figure.suptitle(wrapped, fontsize=11)
    _leave_room(figure, legend_rows=legend_rows, title_lines=wrapped.count("\n") + 1)
    return figure


def figure_test_risk(results: DemoResults) -> Any:
    return _risk_figure(
        results,
        plot_test_risk,
        f"Test risk against the target ε: mean over {results.settings.trials} random "
        "calibration/test splits (band: ±1 sd). A policy keeps to its target on average "
        "below the black line risk = ε.",
    )


def figure_violations(results: DemoResults) -> Any:
    return _risk_figure(
        results,
        plot_violations,
        "Violations: share of calibration draws whose policy's risk on all held-out data "
        "exceeds ε. The dashed line δ bounds ucb and ltt only; crc promises the mean risk and "
        "naive nothing.",
    )


def figure_efficiency(results: DemoResults) -> Any:
    """One row per risk: the mean exit (left) and the share of FLOPs saved (right)."""
    plt = _pyplot()
    count = len(results.risks)
    figure, axes = plt.subplots(
        count, 2, figsize=(2 * _PANEL_WIDTH, 3.4 * count + 1.6), squeeze=False
    )
    for row, risk in enumerate(results.risks):
        plot_mean_exit(axes[row, 0], results, risk, legend=False)
        plot_flops_saving(axes[row, 1], results, risk, legend=False)
    legend_rows = _figure_legend(figure, axes[0, 0])
    wrapped = _title(
        f"Efficiency of each procedure's policy, mean over {results.settings.trials} splits: "
        "the mean exit (left; 0 = the first exit) and the share of the full model's FLOPs "
        "saved (right), one row per risk.",
        width=int(10.5 * figure.get_figwidth()),
    )
    figure.suptitle(wrapped, fontsize=11)
    _leave_room(figure, legend_rows=legend_rows, title_lines=wrapped.count("\n") + 1)
    return figure


def figure_exit_histogram(results: DemoResults) -> Any:
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(_PANEL_WIDTH * 1.2, 4.0))
    plot_exit_histogram(ax, results)
    figure.tight_layout()
    return figure


def figure_picture_grid(grid: PictureGrid) -> Any:
    """A picture grid as one figure, with its colour bar and colour legend."""
    plt = _pyplot()
    width, cell_height, _ = _grid_geometry(grid.rows[0].cells[0].image.shape)
    legend_rows = -(-len(grid.legend) // 6)  # ceil
    extra_height = 0.6 + 0.25 * legend_rows + (0.4 if grid.xticks else 0.0)
    figure, axes = plt.subplots(
        len(grid.rows),
        len(grid.columns),
        figsize=(width * len(grid.columns) + 1.2, cell_height * len(grid.rows) + extra_height),
        squeeze=False,
    )
    plot_picture_grid(axes, grid)
    height = figure.get_figheight()
    if grid.title:
        figure.suptitle(_plain(grid.title), fontsize=10)
    bottom = (0.1 + 0.25 * legend_rows) / height if legend_rows else 0.0
    figure.tight_layout(rect=(0, bottom, 1, 1 - (0.35 / height if grid.title else 0.0)))
    if grid.legend:
        from matplotlib.patches import Patch

        handles = [
            Patch(facecolor=entry.color, edgecolor="#555555", label=_plain(entry.label))
            for entry in grid.legend
        ]
        figure.legend(
            handles=handles,
            loc="lower center",
            bbox_to_anchor=(0.5, 0.0),
            ncol=min(len(handles), 6),
            fontsize=7,
            frameon=False,
        )
    if grid.colorbar:
        image = axes[0, -1].images[0]
        bar = figure.colorbar(image, ax=list(axes.ravel()), shrink=0.8)
        bar.set_label(_plain(grid.colorbar))
        if grid.colorbar_ticks:
            bar.set_ticks(
                [p for p, _ in grid.colorbar_ticks],
                labels=[_plain(t) for _, t in grid.colorbar_ticks],
            )
    return figure


def class_colours(n_classes: int, *, cmap: str = "nipy_spectral") -> list[str]:
    """``#rrggbb`` colours of classes 0..n-1 drawn with ``cmap`` between 0 and n - 1."""
    import matplotlib
    from matplotlib.colors import to_hex

    colours = matplotlib.colormaps[cmap]
    return [to_hex(colours(k / max(n_classes - 1, 1))) for k in range(n_classes)]


PLOTS: dict[str, Callable[[DemoResults], Any]] = {
    "test_risk.png": figure_test_risk,
    "violations.png": figure_violations,
    "efficiency.png": figure_efficiency,
    "exit_histogram.png": figure_exit_histogram,
}


# ------------------------------------------------------------------- checks and output


def _grid_geometry(shape: Sequence[int]) -> tuple[float, float, float]:
    """Width and height (inches) of one grid cell, and the first image's aspect ratio."""
    aspect = shape[1] / max(shape[0], 1)
    cell_height = 1.7 if aspect < 3 else 0.9
    width = min(2.0 * aspect, 9.0) if aspect >= 3 else 1.7
    return width, cell_height, aspect


def _grid_error(name: Any, text: str) -> ValueError:
    return ValueError(f"figure {str(name)[:60]!r}: {text}")


def figure_file(spec: Mapping[str, Any]) -> str:
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


def check_grid_shape(
    name: str, n_rows: int, n_columns: int, shapes: Sequence[Sequence[int]]
) -> None:
    """Raise ValueError unless a grid of these image shapes is within the limits.

    At most :data:`MAX_GRID_ROWS` rows and :data:`MAX_GRID_COLUMNS` columns, every image
    2-D with sides up to :data:`MAX_IMAGE_SIDE`, at most :data:`MAX_GRID_PIXELS` image
    pixels in all and a drawn figure of at most :data:`MAX_CANVAS_PIXELS` pixels.
    """
    if not n_rows or not n_columns:
        raise ValueError("a picture grid needs at least one row and one column.")
    if n_rows > MAX_GRID_ROWS or n_columns > MAX_GRID_COLUMNS:
        raise _grid_error(
            name,
            f"a picture grid may have at most {MAX_GRID_ROWS} rows and {MAX_GRID_COLUMNS} "
            f"columns; got {n_rows} x {n_columns}.",
        )
    pixels = 0
    for shape in shapes:  # a loop over the capped number of cells
        if len(shape) != 2 or 0 in shape:
            raise _grid_error(name, f"images must be 2-D and non-empty; got shape {tuple(shape)}.")
        if max(shape) > MAX_IMAGE_SIDE:
            raise _grid_error(
                name,
                f"images may be at most {MAX_IMAGE_SIDE} pixels on a side; got "
                f"{shape[0]} x {shape[1]}.",
            )
        pixels += int(shape[0]) * int(shape[1])
        if pixels > MAX_GRID_PIXELS:
            raise _grid_error(
                name, f"a picture grid may hold at most {MAX_GRID_PIXELS} image pixels."
            )
    cell_width, cell_height, _ = _grid_geometry(shapes[0])
    canvas = (cell_width * n_columns + 1.2) * (cell_height * n_rows + 1.4) * _DPI**2
    if canvas > MAX_CANVAS_PIXELS:
        raise _grid_error(
            name,
            f"the drawn grid would have {canvas:.3g} pixels; the limit is {MAX_CANVAS_PIXELS}.",
        )


def check_picture_grid(spec: Mapping[str, Any]) -> list[list[np.ndarray]]:
    """The grid's images as float arrays, after checking its shape against the limits.

    See :func:`check_grid_shape`; the counts and sizes are checked before any image is
    converted.
    """
    name = spec.get("file")
    columns, rows = spec.get("columns"), spec.get("rows")
    if not isinstance(columns, list) or not isinstance(rows, list):
        raise _grid_error(name, "`columns` and `rows` must be lists.")
    if not rows or not columns:
        raise ValueError("a picture grid needs at least one row and one column.")
    check_grid_shape(str(name), len(rows), len(columns), [(1, 1)])  # the counts first
    shapes = []
    for r, row in enumerate(rows):  # a loop over a capped number of rows and cells
        cells = row.get("cells") if isinstance(row, Mapping) else None
        if not isinstance(cells, list):
            raise _grid_error(name, f"row {r} must be an object with a list of `cells`.")
        if len(cells) != len(columns):
            raise ValueError(
                f"row {r} of figure {name!r} has {len(cells)} cells for {len(columns)} columns."
            )
        for c, cell in enumerate(cells):
            raw = cell.get("image") if isinstance(cell, Mapping) else None
            if not isinstance(raw, list) or not raw or not isinstance(raw[0], list):
                raise _grid_error(name, f"cell ({r}, {c}): `image` must be an H x W nested list.")
            shapes.append((len(raw), len(raw[0])))
            check_grid_shape(str(name), len(rows), len(columns), shapes)
    images: list[list[np.ndarray]] = []
    for r, row in enumerate(rows):  # the same capped grid, now converted
        converted = []
        for c, cell in enumerate(row["cells"]):
            try:
                image = np.asarray(cell["image"], dtype=float)  # (H, W)
            except (TypeError, ValueError) as error:
                raise _grid_error(
                    name, f"cell ({r}, {c}): `image` must be an H x W array of numbers."
                ) from error
            if image.ndim != 2 or image.size == 0:
                raise _grid_error(
                    name, f"cell ({r}, {c}): `image` must be 2-D; got shape {image.shape}."
                )
            converted.append(image)
        images.append(converted)
    return images


def figure_files(results: Mapping[str, Any] | DemoResults) -> list[str]:
    """The checked PNG file names of the results' picture grids, in order."""
    if isinstance(results, DemoResults):
        return [grid.file for grid in results.figures]
    figures = results.get("figures", [])
    if not isinstance(figures, list):
        raise ValueError(f"RESULTS: `figures` must be a list; got {type(figures).__name__}.")
    return [figure_file(spec if isinstance(spec, Mapping) else {}) for spec in figures]


def _count(value: Any, name: str, limit: int) -> int:
    if not isinstance(value, (list, dict)) or len(value) > limit:
        size = len(value) if isinstance(value, (list, dict)) else type(value).__name__
        raise ValueError(f"RESULTS: `{name}` must hold at most {limit} entries; got {size}.")
    return len(value)


def check_figures(results: Mapping[str, Any]) -> None:
    """Raise ValueError unless the results content can be drawn within the limits.

    Picture grids: plain, distinct PNG names (see :func:`figure_files`), at most
    :data:`MAX_FIGURES` of them, each within :func:`check_picture_grid`'s limits. Plots: at
    most :data:`MAX_RISKS` risks of at most :data:`MAX_ROWS_PER_RISK` evaluation rows, and at
    most :data:`MAX_EXITS` exits. Sizes are checked before any image is converted.
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
    timed = results.get("timed_policy", results.get("exit_histogram"))
    counts = timed.get("exit_counts", timed.get("counts")) if isinstance(timed, Mapping) else None
    _count(counts, "timed_policy.exit_counts", MAX_EXITS)


def _png(figure: Any, *, layout: bool) -> bytes:
    """``figure`` as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    handle = io.BytesIO()
    try:
        if layout:
            figure.tight_layout()
        figure.savefig(handle, dpi=_DPI, format="png")
    finally:
        plt.close(figure)
    return handle.getvalue()


def render_plots(results: DemoResults) -> dict[str, bytes]:
    """Every plot and picture grid of a report as PNG bytes, by file name.

    Raises ValueError for results that cannot be drawn.
    """
    jobs: list[tuple[str, Callable[[], Any], bool]] = [
        (name, functools.partial(draw, results), False) for name, draw in PLOTS.items()
    ]
    jobs += [
        (grid.file, functools.partial(figure_picture_grid, grid), False)
        for grid in results.figures
    ]
    drawn: dict[str, bytes] = {}
    for name, draw, layout in jobs:  # a loop over the report's few pictures
        try:
            drawn[name] = _png(draw(), layout=layout)
        except (KeyError, TypeError, IndexError, AttributeError, ValueError) as error:
            if isinstance(error, ValueError) and str(error).startswith(("RESULTS", "figure")):
                raise
            raise ValueError(
                f"RESULTS: cannot draw {name} ({type(error).__name__}: {str(error)[:200]})."
            ) from error
    return drawn
