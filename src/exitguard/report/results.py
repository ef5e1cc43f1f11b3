"""Typed results of a demo: what a report page shows, with a JSON round trip.

:class:`DemoResults` holds the results of the vision and text demos (classification,
segmentation, diffusion, text), :class:`DriftResults` those of the drift demo. Both are
frozen dataclasses; ``to_dict()`` gives the ``results.json`` content and ``from_dict()``
reads it back, checking every field the page or a plot uses (a wrong type or a missing
field is a ValueError naming it, prefixed ``RESULTS:``). Task-specific data that no page
reads is kept verbatim in ``extra`` mappings.

Schema ``exitguard.DemoResults`` version 2. Version 1 files (written before the typed
results) are upgraded on reading: their exit counts become 0-based and their free-form
``timing`` table becomes a :class:`TimedPolicy`.

Exits are counted one way for people and for the API alike (see :data:`EXIT_CONVENTION`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from exitguard.evaluation import Evaluation, EvaluationRow

_T = TypeVar("_T")

RESULTS_SCHEMA = "exitguard.DemoResults"
SCHEMA_VERSION = 2
EXIT_CONVENTION = (
    "Exits are counted from 0: exit 0 is the first exit head and exit L − 1, the last, is "
    "the full model (L exits in all). Every table, plot and command line of exitguard counts "
    "them this way."
)
"""The one exit-counting convention, stated once on every page."""

GUARANTEES = {
    "naive": "none",
    "crc": "E[risk] ≤ ε",
    "crc-marginal": "E[risk] ≤ ε if monotone",
}
"""What each procedure promises (the rest: P(risk ≤ ε) ≥ 1 − δ)."""


def guarantee_of(procedure: str) -> str:
    """The promise of a procedure in words: none, the mean risk, or with probability 1 − δ."""
    return GUARANTEES.get(procedure, "P(risk ≤ ε) ≥ 1 − δ")


def speed_phrase(ratio: float, *, baseline: str = "the full model") -> str:
    """``ratio`` (baseline time / early-exit time) in words: "1.35× faster", "1.01× slower".

    A ratio below 1 is a slowdown and is written as one (0.99× faster is 1.01× slower).
    """
    if not math.isfinite(ratio) or ratio <= 0:
        return "not measured"
    if round(ratio, 2) > 1.0:
        return f"{ratio:.2f}× faster than {baseline}"
    if round(1.0 / ratio, 2) > 1.0:
        return f"{1.0 / ratio:.2f}× slower than {baseline}"
    return f"as fast as {baseline} (1.00×)"


# ----------------------------------------------------------------------------- checks


def _error(path: str, text: str) -> ValueError:
    return ValueError(f"RESULTS: `{path}` {text}")


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _error(path, f"must be an object; got {type(value).__name__}.")
    return value


def _get(data: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in data:
        raise _error(f"{path}.{key}" if path else key, "is missing.")
    return data[key]


def _text(value: Any, path: str, *, optional: bool = False) -> str:
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise _error(path, f"must be a string; got {type(value).__name__}.")
    return value


def _float(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _error(path, f"must be a number; got {str(value)[:60]!r}.")
    return float(value)


def _number(value: Any, path: str, *, optional: bool = False) -> float | None:
    """A number, or None when ``optional`` and null."""
    return None if value is None and optional else _float(value, path)


def _int(value: Any, path: str, *, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _error(path, f"must be a number (an integer >= {low}); got {str(value)[:60]!r}.")
    return int(value)


def _integer(value: Any, path: str, *, optional: bool = False, low: int = 0) -> int | None:
    """An integer >= ``low``, or None when ``optional`` and null."""
    return None if value is None and optional else _int(value, path, low=low)


def _list(value: Any, path: str, *, limit: int | None = None) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise _error(path, f"must be a list; got {type(value).__name__}.")
    if limit is not None and len(value) > limit:
        raise _error(path, f"must hold at most {limit} entries; got {len(value)}.")
    return list(value)


def _each(read: Callable[[Any, str], _T], value: Any, path: str) -> tuple[_T, ...]:
    """``read(item, path)`` of every item of the list ``value``, each with its own path."""
    return tuple(read(item, f"{path}[{i}]") for i, item in enumerate(_list(value, path)))


def _numbers(value: Any, path: str, *, limit: int | None = None) -> tuple[float, ...]:
    return tuple(
        _float(item, f"{path}[{i}]") for i, item in enumerate(_list(value, path, limit=limit))
    )


def _texts(value: Any, path: str) -> tuple[str, ...]:
    return tuple(_text(item, f"{path}[{i}]") for i, item in enumerate(_list(value, path)))


def _cell_value(value: Any, path: str) -> Any:
    """A table cell: a string, a number, a boolean or null (shown as "–")."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise _error(path, f"must be a string, a number or null; got {type(value).__name__}.")


def _extra(data: Mapping[str, Any], cls: type, path: str) -> dict[str, Any]:
    """Entries of ``data`` that are no field of the dataclass ``cls``, plus its own ``extra``
    (kept verbatim)."""
    known = {field.name for field in dataclasses.fields(cls)}
    extra = dict(_mapping(data.get("extra", {}), f"{path}.extra"))
    extra.update({k: v for k, v in data.items() if k not in known})
    return extra


def _finite(value: Any) -> Any:
    """``value`` for strict JSON: NaN and infinities become None, arrays become lists."""
    if isinstance(value, np.ndarray):
        return _finite(value.tolist())
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return _finite(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


# ---------------------------------------------------------------------------- pieces


@dataclasses.dataclass(frozen=True)
class Machine:
    """Where the demo ran: Python and torch versions, torch's CPU threads, the platform."""

    python: str = ""
    torch: str = ""
    threads: int | None = None
    platform: str = ""

    def describe(self) -> str:
        parts = [f"Python {self.python}" if self.python else ""]
        parts.append(f"torch {self.torch}" if self.torch else "")
        parts.append(f"{self.threads} CPU threads" if self.threads is not None else "")
        parts.append(self.platform)
        return ", ".join(part for part in parts if part) or "not recorded"

    @classmethod
    def from_dict(cls, data: Any, path: str = "machine") -> Machine:
        data = _mapping(data, path)
        threads = data.get("threads")
        return cls(
            python=str(data.get("python", "")),
            torch=str(data.get("torch", "")),
            threads=_integer(threads, f"{path}.threads", optional=True),
            platform=str(data.get("platform", "")),
        )


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """The data a demo ran on: ``n_heldout`` held-out ``unit`` (images, scenes, verses)."""

    name: str
    source: str = ""
    n_train: int | None = None
    n_heldout: int | None = None
    unit: str = "images"
    note: str = ""
    classes: tuple[str, ...] = ()
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, path: str = "dataset") -> DatasetInfo:
        data = _mapping(data, path)
        return cls(
            name=str(data.get("name", "")),
            source=str(data.get("source", "")),
            n_train=_integer(data.get("n_train"), f"{path}.n_train", optional=True),
            n_heldout=_integer(data.get("n_heldout"), f"{path}.n_heldout", optional=True),
            unit=_text(data.get("unit", "images"), f"{path}.unit"),
            note=_text(data.get("note", data.get("heldout_note", "")), f"{path}.note"),
            classes=tuple(str(c) for c in _list(data.get("classes", []), f"{path}.classes")),
            extra={k: v for k, v in _extra(data, cls, path).items() if k != "heldout_note"},
        )


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """The multi-exit network: ``n_exits`` exits, FLOPs and held-out quality per exit."""

    description: str
    n_exits: int
    flops_per_exit: tuple[float, ...]
    full_flops: float | None = None
    flops_unit: str = ""
    accuracy_per_exit: tuple[float, ...] | None = None
    accuracy_label: str = "held-out accuracy"
    fingerprint: str = ""
    from_cache: bool | None = None
    train_seconds: float | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 1 <= self.n_exits <= MAX_EXITS:
            raise _error(
                "model.n_exits", f"must be an integer in [1, {MAX_EXITS}]; got {self.n_exits!r}."
            )
        if len(self.flops_per_exit) != self.n_exits:
            raise _error(
                "model.flops_per_exit",
                f"must hold one number per exit ({self.n_exits}); got {len(self.flops_per_exit)}.",
            )
        if self.accuracy_per_exit is not None and len(self.accuracy_per_exit) != self.n_exits:
            raise _error(
                "model.accuracy_per_exit",
                f"must hold one number per exit ({self.n_exits}); got "
                f"{len(self.accuracy_per_exit)}.",
            )

    @classmethod
    def from_dict(cls, data: Any, path: str = "model") -> ModelInfo:
        data = _mapping(data, path)
        n_exits = data.get("n_exits")
        if (
            isinstance(n_exits, bool)
            or not isinstance(n_exits, int)
            or not (1 <= n_exits <= MAX_EXITS)
        ):
            raise ValueError(
                f"RESULTS: `model.n_exits` must be an integer in [1, {MAX_EXITS}]; got "
                f"{str(n_exits)[:60]!r}."
            )
        accuracy = data.get("accuracy_per_exit")
        from_cache = data.get("from_cache")
        return cls(
            description=str(data.get("description", "")),
            n_exits=n_exits,
            flops_per_exit=_numbers(
                _get(data, "flops_per_exit", path), f"{path}.flops_per_exit", limit=MAX_EXITS
            ),
            full_flops=_number(data.get("full_flops"), f"{path}.full_flops", optional=True),
            flops_unit=_text(data.get("flops_unit", ""), f"{path}.flops_unit", optional=True),
            accuracy_per_exit=None
            if accuracy is None
            else _numbers(accuracy, f"{path}.accuracy_per_exit", limit=MAX_EXITS),
            accuracy_label=_text(
                data.get("accuracy_label", "held-out accuracy"), f"{path}.accuracy_label"
            ),
            fingerprint=str(data.get("fingerprint", "") or ""),
            from_cache=from_cache if isinstance(from_cache, bool) else None,
            train_seconds=_number(
                data.get("train_seconds"), f"{path}.train_seconds", optional=True
            ),
            extra=_extra(data, cls, path),
        )


@dataclasses.dataclass(frozen=True)
class Settings:
    """The calibration settings the page states (δ, n_cal, splits, the ε grid)."""

    delta: float
    n_cal: int
    trials: int
    target_risks: tuple[float, ...]
    table_target_risks: tuple[float, ...] = ()
    procedures: tuple[str, ...] = ()
    seed: int | None = None
    confidence: str = ""
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def shown_target_risks(self) -> tuple[float, ...]:
        """The target risks of the page's tables (all of them unless a subset is named)."""
        return self.table_target_risks or self.target_risks

    @classmethod
    def from_dict(cls, data: Any, path: str = "settings") -> Settings:
        data = _mapping(data, path)
        target_risks = _numbers(_get(data, "target_risks", path), f"{path}.target_risks")
        seed = data.get("seed")
        return cls(
            delta=_float(_get(data, "delta", path), f"{path}.delta"),
            n_cal=_int(_get(data, "n_cal", path), f"{path}.n_cal"),
            trials=_int(_get(data, "trials", path), f"{path}.trials"),
            target_risks=target_risks,
            table_target_risks=_numbers(
                data.get("table_target_risks", []), f"{path}.table_target_risks"
            ),
            procedures=_texts(data.get("procedures", []), f"{path}.procedures"),
            seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
            confidence=str(data.get("confidence", "") or ""),
            extra=_extra(data, cls, path),
        )


_ROW_NUMBERS = tuple(
    field.name for field in dataclasses.fields(EvaluationRow) if field.name not in ("procedure",)
)


def _evaluation(value: Any, path: str) -> Evaluation:
    data = _mapping(value, path)
    rows = _list(_get(data, "rows", path), f"{path}.rows", limit=MAX_ROWS_PER_RISK)
    for i, row in enumerate(rows):  # a loop over a capped number of rows
        row = _mapping(row, f"{path}.rows[{i}]")
        _text(_get(row, "procedure", f"{path}.rows[{i}]"), f"{path}.rows[{i}].procedure")
        for name in _ROW_NUMBERS:
            optional = name in ("violation_p_value", "mean_cost", "sd_cost", "relative_saving")
            _number(row.get(name), f"{path}.rows[{i}].{name}", optional=optional)
    try:
        return Evaluation.from_dict(dict(data))
    except TypeError as error:
        raise _error(path, f"is not an evaluation ({error}).") from error


@dataclasses.dataclass(frozen=True)
class RiskResult:
    """One risk over repeated splits: FLOPs (``evaluation``) and exits (``evaluation_exits``).

    ``evaluation_exits`` is the same evaluation with the cost of a sample its 0-based exit,
    so its ``mean_cost`` is the mean exit (see :data:`EXIT_CONVENTION`).
    """

    title: str
    loss_bound: float
    evaluation: Evaluation
    evaluation_exits: Evaluation
    note: str = ""

    def row(self, procedure: str, target_risk: float) -> tuple[EvaluationRow, EvaluationRow]:
        """The FLOPs row and the exits row of one procedure at one target risk."""
        return (
            self.evaluation.row(procedure, target_risk),
            self.evaluation_exits.row(procedure, target_risk),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "loss_bound": self.loss_bound,
            "note": self.note,
            "evaluation": self.evaluation.to_dict(),
            "evaluation_exits": self.evaluation_exits.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Any, path: str, *, title: str = "") -> RiskResult:
        data = _mapping(data, path)
        return cls(
            title=_text(data.get("title", title), f"{path}.title"),
            loss_bound=_float(_get(data, "loss_bound", path), f"{path}.loss_bound"),
            evaluation=_evaluation(_get(data, "evaluation", path), f"{path}.evaluation"),
            evaluation_exits=_evaluation(
                _get(data, "evaluation_exits", path), f"{path}.evaluation_exits"
            ),
            note=_text(data.get("note", ""), f"{path}.note"),
        )


@dataclasses.dataclass(frozen=True)
class Speed:
    """A side-by-side timing at one batch size: ``speedup`` = baseline time / early-exit time.

    ``baseline`` and ``early`` are the two measured rates or latencies, in ``unit``;
    ``predicted`` is the speed-up the latency profile predicts for the same exits.
    """

    batch_size: int
    speedup: float
    baseline: float | None = None
    early: float | None = None
    unit: str = ""
    predicted: float | None = None

    @classmethod
    def from_dict(cls, data: Any, path: str) -> Speed:
        data = _mapping(data, path)
        return cls(
            batch_size=_int(_get(data, "batch_size", path), f"{path}.batch_size", low=1),
            speedup=_float(_get(data, "speedup", path), f"{path}.speedup"),
            baseline=_number(data.get("baseline"), f"{path}.baseline", optional=True),
            early=_number(data.get("early"), f"{path}.early", optional=True),
            unit=_text(data.get("unit", ""), f"{path}.unit"),
            predicted=_number(data.get("predicted"), f"{path}.predicted", optional=True),
        )


@dataclasses.dataclass(frozen=True)
class TimedPolicy:
    """The one calibrated policy that was run for real, with real skipping, and timed.

    It is calibrated on one calibration split (``n_cal`` samples) and run on the rest
    (``n_test``); the evaluation tables are means over many such splits instead.

    Attributes
    ----------
    exit_counts : tuple of int, length L
        How many of the ``unit`` left at each exit (0-based).
    mean_exit : float
        Mean 0-based exit on the timed samples.
    flops_saving : float
        ``1 - FLOPs / full model FLOPs`` on the timed samples.
    speeds : tuple of Speed
        Measured side by side against ``baseline`` (normally the full model).
    measures : tuple of (label, value)
        Further measurements shown in the page's table (accuracy, test risk, ...).
    quality : str
        One phrase for the summary (e.g. "accuracy 0.951 vs 0.957 for the full model").
    counted : str
        What ``exit_counts`` counts when it is not ``unit`` (e.g. "(sample, step) pairs").
    """

    procedure: str
    risk: str
    target_risk: float
    threshold: float | None
    certified: bool | None
    n_cal: int | None
    n_test: int | None
    unit: str
    exit_counts: tuple[int, ...]
    mean_exit: float | None
    flops_saving: float | None
    speeds: tuple[Speed, ...] = ()
    baseline: str = "the full model"
    measures: tuple[tuple[str, Any], ...] = ()
    quality: str = ""
    counted: str = ""

    @property
    def counted_unit(self) -> str:
        """What :attr:`exit_counts` counts (``counted``, else ``unit``)."""
        return self.counted or self.unit

    @property
    def flops_speedup(self) -> float | None:
        """The FLOPs-ideal speed-up ``1 / (1 - flops_saving)``."""
        if self.flops_saving is None or self.flops_saving >= 1.0:
            return None
        return 1.0 / (1.0 - self.flops_saving)

    @property
    def slower(self) -> tuple[Speed, ...]:
        """The timings at which the early-exit run was slower than the baseline."""
        return tuple(s for s in self.speeds if round(1.0 / s.speedup, 2) > 1.0)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["measures"] = [list(item) for item in self.measures]
        return data

    @classmethod
    def from_dict(cls, data: Any, path: str = "timed_policy") -> TimedPolicy:
        data = _mapping(data, path)
        certified = data.get("certified")
        measures = []
        for i, item in enumerate(_list(data.get("measures", []), f"{path}.measures")):
            pair = _list(item, f"{path}.measures[{i}]")
            if len(pair) != 2:
                raise _error(f"{path}.measures[{i}]", "must be a [label, value] pair.")
            label = _text(pair[0], f"{path}.measures[{i}][0]")
            measures.append((label, _cell_value(pair[1], f"{path}.measures[{i}][1]")))
        return cls(
            procedure=_text(_get(data, "procedure", path), f"{path}.procedure"),
            risk=_text(_get(data, "risk", path), f"{path}.risk"),
            target_risk=_float(_get(data, "target_risk", path), f"{path}.target_risk"),
            threshold=_number(data.get("threshold"), f"{path}.threshold", optional=True),
            certified=certified if isinstance(certified, bool) else None,
            n_cal=_integer(data.get("n_cal"), f"{path}.n_cal", optional=True),
            n_test=_integer(data.get("n_test"), f"{path}.n_test", optional=True),
            unit=_text(data.get("unit", "test samples"), f"{path}.unit"),
            exit_counts=tuple(
                _int(c, f"{path}.exit_counts[{i}]")
                for i, c in enumerate(
                    _list(_get(data, "exit_counts", path), f"{path}.exit_counts", limit=MAX_EXITS)
                )
            ),
            mean_exit=_number(data.get("mean_exit"), f"{path}.mean_exit", optional=True),
            flops_saving=_number(data.get("flops_saving"), f"{path}.flops_saving", optional=True),
            speeds=tuple(
                Speed.from_dict(s, f"{path}.speeds[{i}]")
                for i, s in enumerate(_list(data.get("speeds", []), f"{path}.speeds"))
            ),
            baseline=_text(data.get("baseline", "the full model"), f"{path}.baseline"),
            measures=tuple(measures),
            quality=_text(data.get("quality", ""), f"{path}.quality"),
            counted=_text(data.get("counted", ""), f"{path}.counted"),
        )


@dataclasses.dataclass(frozen=True)
class Table:
    """A table of the page: a header and rows of strings, numbers, booleans or nulls."""

    title: str
    header: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "header": list(self.header),
            "rows": [list(row) for row in self.rows],
            "note": self.note,
        }

    @classmethod
    def from_dict(cls, data: Any, path: str) -> Table:
        data = _mapping(data, path)
        rows = []
        for r, row in enumerate(_list(_get(data, "rows", path), f"{path}.rows", limit=10_000)):
            cells = _list(row, f"{path}.rows[{r}]")
            rows.append(
                tuple(_cell_value(v, f"{path}.rows[{r}][{c}]") for c, v in enumerate(cells))
            )
        return cls(
            title=str(data.get("title", "")),
            header=tuple(str(h) for h in _list(_get(data, "header", path), f"{path}.header")),
            rows=tuple(rows),
            note=str(data.get("note", "")),
        )


@dataclasses.dataclass(frozen=True)
class GridCell:
    """One image of a picture grid, (H, W), drawn with ``cmap`` between ``vmin`` and ``vmax``."""

    image: NDArray[np.float64]
    cmap: str = "gray"
    vmin: float | None = None
    vmax: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": np.asarray(self.image, dtype=np.float64).round(4).tolist(),
            "cmap": self.cmap,
            "vmin": self.vmin,
            "vmax": self.vmax,
        }


@dataclasses.dataclass(frozen=True)
class GridRow:
    label: str
    cells: tuple[GridCell, ...]


@dataclasses.dataclass(frozen=True)
class LegendEntry:
    """A colour swatch of a picture grid's legend: ``color`` is ``#rrggbb``."""

    label: str
    color: str

    def __post_init__(self) -> None:
        if not re.fullmatch(r"#[0-9a-fA-F]{6}", self.color):
            raise ValueError(f"RESULTS: a legend colour must be '#rrggbb'; got {self.color!r}.")


@dataclasses.dataclass(frozen=True)
class PictureGrid:
    """A grid of images saved as ``file``: one row per example, one column per variant.

    ``colorbar`` labels a colour bar for the last column's scale (with ``colorbar_ticks``
    as (value, label) pairs); ``legend`` names colours (e.g. classes of a mask);
    ``xlabel``/``ylabel`` and ``xticks``/``yticks`` ((position, label) pairs) label the
    axes of every image, for images that are maps rather than pictures.
    """

    file: str
    columns: tuple[str, ...]
    rows: tuple[GridRow, ...]
    title: str = ""
    caption: str = ""
    colorbar: str = ""
    colorbar_ticks: tuple[tuple[float, str], ...] = ()
    legend: tuple[LegendEntry, ...] = ()
    xlabel: str = ""
    ylabel: str = ""
    xticks: tuple[tuple[float, str], ...] = ()
    yticks: tuple[tuple[float, str], ...] = ()

    def __post_init__(self) -> None:
        from exitguard.report.plots import check_grid_shape, figure_file

        figure_file({"file": self.file})
        for r, row in enumerate(self.rows):  # a loop over a few rows
            if len(row.cells) != len(self.columns):
                raise ValueError(
                    f"row {r} of figure {self.file!r} has {len(row.cells)} cells for "
                    f"{len(self.columns)} columns."
                )
        check_grid_shape(
            self.file,
            len(self.rows),
            len(self.columns),
            [np.shape(cell.image) for row in self.rows for cell in row.cells],
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "title": self.title,
            "caption": self.caption,
            "columns": list(self.columns),
            "rows": [
                {
                    "label": row.label,
                    "cells": [cell.to_dict() for cell in row.cells],
                }
                for row in self.rows
            ],
            "colorbar": self.colorbar,
            "colorbar_ticks": [list(tick) for tick in self.colorbar_ticks],
            "legend": [dataclasses.asdict(entry) for entry in self.legend],
            "xlabel": self.xlabel,
            "ylabel": self.ylabel,
            "xticks": [list(tick) for tick in self.xticks],
            "yticks": [list(tick) for tick in self.yticks],
        }

    @classmethod
    def from_dict(cls, data: Any, path: str) -> PictureGrid:
        """A grid from JSON, its sizes checked before any image is converted."""
        from exitguard.report.plots import check_picture_grid, figure_file

        data = _mapping(data, path)
        images = check_picture_grid(data)  # (rows, columns) of (H, W) arrays
        rows = []
        for r, (row, converted) in enumerate(zip(data["rows"], images, strict=True)):
            cells = tuple(
                GridCell(
                    image=image,
                    cmap=_text(cell.get("cmap", "gray"), f"{path}.rows[{r}].cells[{c}].cmap"),
                    vmin=_number(
                        cell.get("vmin"), f"{path}.rows[{r}].cells[{c}].vmin", optional=True
                    ),
                    vmax=_number(
                        cell.get("vmax"), f"{path}.rows[{r}].cells[{c}].vmax", optional=True
                    ),
                )
                for c, (cell, image) in enumerate(zip(row["cells"], converted, strict=True))
            )
            rows.append(GridRow(label=str(row.get("label", "")), cells=cells))
        return cls(
            file=figure_file(data),
            columns=tuple(str(c) for c in data["columns"]),
            rows=tuple(rows),
            title=str(data.get("title", "") or ""),
            caption=str(data.get("caption", "") or ""),
            colorbar=str(data.get("colorbar", "") or ""),
            colorbar_ticks=_ticks(data.get("colorbar_ticks", []), f"{path}.colorbar_ticks"),
            legend=tuple(
                LegendEntry(
                    label=_text(
                        _mapping(e, f"{path}.legend[{i}]").get("label"), f"{path}.legend[{i}].label"
                    ),
                    color=_text(e.get("color"), f"{path}.legend[{i}].color"),
                )
                for i, e in enumerate(_list(data.get("legend", []), f"{path}.legend", limit=64))
            ),
            xlabel=str(data.get("xlabel", "") or ""),
            ylabel=str(data.get("ylabel", "") or ""),
            xticks=_ticks(data.get("xticks", []), f"{path}.xticks"),
            yticks=_ticks(data.get("yticks", []), f"{path}.yticks"),
        )


def _ticks(value: Any, path: str) -> tuple[tuple[float, str], ...]:
    ticks = []
    for i, item in enumerate(_list(value, path, limit=MAX_TICKS)):
        pair = _list(item, f"{path}[{i}]")
        if len(pair) != 2:
            raise _error(f"{path}[{i}]", "must be a [position, label] pair.")
        ticks.append((_float(pair[0], f"{path}[{i}][0]"), str(pair[1])))
    return tuple(ticks)


MAX_FIGURES = 16
MAX_RISKS = 12
MAX_ROWS_PER_RISK = 10_000
MAX_EXITS = 4096
MAX_TICKS = 256


# ----------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class DemoResults:
    """The results of a demo, as its report page shows them.

    Attributes
    ----------
    task : str
        ``"classification"``, ``"segmentation"``, ``"diffusion"``, ``"text"`` (or your own).
    summary : tuple of str
        The page's summary lines (also printed by ``exitguard demo``).
    risks : mapping of risk name -> RiskResult
        Every risk's repeated-split evaluation (means over ``settings.trials`` splits).
    timed : TimedPolicy
        The one policy run for real.
    policy : mapping
        That policy as :meth:`exitguard.ExitPolicy.to_dict` writes it.
    tables, figures : tuples of Table and PictureGrid
        Further tables and picture grids of the task.
    extra : mapping
        Task-specific data no page reads, kept in ``results.json`` as given.
    """

    task: str
    title: str
    summary: tuple[str, ...]
    dataset: DatasetInfo
    model: ModelInfo
    settings: Settings
    risks: Mapping[str, RiskResult]
    timed: TimedPolicy
    policy: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    tables: tuple[Table, ...] = ()
    figures: tuple[PictureGrid, ...] = ()
    machine: Machine = Machine()
    created: str = ""
    exitguard_version: str = ""
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.risks:
            raise ValueError("RESULTS: `risks` must map at least one risk to its evaluation.")
        if len(self.risks) > MAX_RISKS:
            raise _error("risks", f"must hold at most {MAX_RISKS} entries; got {len(self.risks)}.")
        if len(self.figures) > MAX_FIGURES:
            raise _error(
                "figures", f"must hold at most {MAX_FIGURES} entries; got {len(self.figures)}."
            )
        names = [figure.file for figure in self.figures]
        if len(set(names)) != len(names):
            raise ValueError(f"figure file names must be distinct; got {names}.")
        if len(self.timed.exit_counts) != self.model.n_exits:
            raise _error(
                "timed_policy.exit_counts",
                f"must hold one count per exit ({self.model.n_exits}); got "
                f"{len(self.timed.exit_counts)}.",
            )

    def __repr__(self) -> str:
        return (
            f"DemoResults(task={self.task!r}, risks={list(self.risks)}, "
            f"n_exits={self.model.n_exits}, trials={self.settings.trials}, "
            f"figures={[f.file for f in self.figures]})"
        )

    def risk_title(self, risk: str) -> str:
        return self.risks[risk].title or risk

    def to_dict(self) -> dict[str, Any]:
        """The ``results.json`` content (strict JSON: NaN and infinities as null)."""
        data = {
            **_header(self),
            "dataset": _with_extra(self.dataset),
            "model": _with_extra(self.model),
            "settings": _with_extra(self.settings),
            "risks": {name: risk.to_dict() for name, risk in self.risks.items()},
            "timed_policy": self.timed.to_dict(),
            "policy": dict(self.policy),
            "tables": [table.to_dict() for table in self.tables],
            "figures": [figure.to_dict() for figure in self.figures],
            "extra": dict(self.extra),
        }
        return _finite(data)  # type: ignore[no-any-return]

    @classmethod
    def from_dict(cls, data: Any) -> DemoResults:
        """Results from ``results.json`` content (version 1 or 2), every page field checked."""
        from exitguard.report.plots import check_figures

        data = _mapping(data, "RESULTS")
        check_figures(data)  # sizes, before any image is converted
        if data.get("schema_version", SCHEMA_VERSION) == 1:
            data = upgrade_v1(data)
        risks = _mapping(_get(data, "risks", ""), "risks")
        return cls(
            task=str(data.get("task", "")),
            title=str(data.get("title", "exitguard report")),
            summary=tuple(str(line) for line in _list(data.get("summary", []), "summary")),
            dataset=DatasetInfo.from_dict(_get(data, "dataset", "")),
            model=ModelInfo.from_dict(_get(data, "model", "")),
            settings=Settings.from_dict(_get(data, "settings", "")),
            risks={
                str(name): RiskResult.from_dict(value, f"risks.{str(name)[:40]}")
                for name, value in risks.items()
            },
            timed=TimedPolicy.from_dict(_get(data, "timed_policy", "")),
            policy=dict(_mapping(data.get("policy", {}), "policy")),
            tables=_each(Table.from_dict, data.get("tables", []), "tables"),
            figures=_each(PictureGrid.from_dict, data.get("figures", []), "figures"),
            **_provenance(data),
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``results.json`` atomically."""
        return _save(self, path)


def _with_extra(value: Any) -> dict[str, Any]:
    data = dataclasses.asdict(value)
    extra = data.pop("extra", {})
    return {**data, "extra": dict(extra)}


# ------------------------------------------------------------------------------ drift


@dataclasses.dataclass(frozen=True)
class DriftDay:
    """One day of the drift stream (days are counted from 0, like exits)."""

    day: int
    severity: float
    served: str  # "policy" or "full model"
    threshold: float | None
    risk_served: float
    risk_original: float
    flops_saved: float
    audits: int
    audit_overhead: float
    accuracy_full_model: float

    @classmethod
    def from_dict(cls, data: Any, path: str) -> DriftDay:
        data = _mapping(data, path)
        return cls(
            day=_int(_get(data, "day", path), f"{path}.day"),
            severity=_float(_get(data, "severity", path), f"{path}.severity"),
            served=_text(_get(data, "served", path), f"{path}.served"),
            threshold=_number(data.get("threshold"), f"{path}.threshold", optional=True),
            risk_served=_float(_get(data, "risk_served", path), f"{path}.risk_served"),
            risk_original=_float(_get(data, "risk_original", path), f"{path}.risk_original"),
            flops_saved=_float(_get(data, "flops_saved", path), f"{path}.flops_saved"),
            audits=_int(_get(data, "audits", path), f"{path}.audits"),
            audit_overhead=_float(data.get("audit_overhead", 0.0), f"{path}.audit_overhead"),
            accuracy_full_model=_float(
                _get(data, "accuracy_full_model", path), f"{path}.accuracy_full_model"
            ),
        )


@dataclasses.dataclass(frozen=True)
class DriftEvent:
    """An alarm of the monitor or a recalibration, on a day."""

    day: int
    event: str  # "alarm" or "recalibrated"
    reason: str = ""
    audit: int | None = None
    threshold: float | None = None
    audits: int | None = None

    @classmethod
    def from_dict(cls, data: Any, path: str) -> DriftEvent:
        data = _mapping(data, path)
        return cls(
            day=_int(_get(data, "day", path), f"{path}.day"),
            event=_text(_get(data, "event", path), f"{path}.event"),
            reason=str(data.get("reason", "") or ""),
            audit=_integer(data.get("audit"), f"{path}.audit", optional=True),
            threshold=_number(data.get("threshold"), f"{path}.threshold", optional=True),
            audits=_integer(data.get("audits"), f"{path}.audits", optional=True),
        )


@dataclasses.dataclass(frozen=True)
class MonitorSegment:
    """The monitor's statistics over the audits of one watched policy (one per audit)."""

    start_day: int
    threshold: float | None
    audits: int
    log10_wealth: tuple[float, ...] = ()
    log10_detector: tuple[float, ...] = ()
    risk_low: tuple[float, ...] = ()
    risk_high: tuple[float, ...] = ()

    @classmethod
    def from_dict(cls, data: Any, path: str) -> MonitorSegment:
        data = _mapping(data, path)
        limit = 10_000_000
        return cls(
            start_day=_int(_get(data, "start_day", path), f"{path}.start_day"),
            threshold=_number(data.get("threshold"), f"{path}.threshold", optional=True),
            audits=_int(_get(data, "audits", path), f"{path}.audits"),
            **{
                key: _numbers(data.get(key, []), f"{path}.{key}", limit=limit)
                for key in ("log10_wealth", "log10_detector", "risk_low", "risk_high")
            },
        )


@dataclasses.dataclass(frozen=True)
class DriftResults:
    """The results of the drift demo: the stream day by day, the monitor, the events.

    ``settings`` is the demo's configuration; the page reads ``target_risk``, ``alpha``,
    ``arl`` and ``delta`` from it.
    """

    title: str
    summary: tuple[str, ...]
    settings: Mapping[str, Any]
    days: tuple[DriftDay, ...]
    events: tuple[DriftEvent, ...]
    segments: tuple[MonitorSegment, ...]
    samples_needed: int
    recalibration_window: int
    policy: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    machine: Machine = Machine()
    created: str = ""
    exitguard_version: str = ""
    task: str = "drift"
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("target_risk", "alpha", "arl"):
            _float(_get(self.settings, key, "settings"), f"settings.{key}")
        if not self.days:
            raise _error("days", "must hold at least one day.")
        if len(self.days) > 100_000:
            raise _error("days", f"must hold at most 100000 days; got {len(self.days)}.")

    def __repr__(self) -> str:
        alarms = sum(e.event == "alarm" for e in self.events)
        return (
            f"DriftResults(days={len(self.days)}, alarms={alarms}, segments={len(self.segments)})"
        )

    @property
    def target_risk(self) -> float:
        return float(self.settings["target_risk"])

    def to_dict(self) -> dict[str, Any]:
        data = {
            **_header(self),
            "settings": dict(self.settings),
            "policy": dict(self.policy),
            "samples_needed": self.samples_needed,
            "recalibration_window": self.recalibration_window,
            "days": [dataclasses.asdict(day) for day in self.days],
            "events": [dataclasses.asdict(event) for event in self.events],
            "segments": [dataclasses.asdict(segment) for segment in self.segments],
            "extra": dict(self.extra),
        }
        return _finite(data)  # type: ignore[no-any-return]

    @classmethod
    def from_dict(cls, data: Any) -> DriftResults:
        data = _mapping(data, "RESULTS")
        return cls(
            title=str(data.get("title", "")),
            summary=tuple(str(line) for line in _list(data.get("summary", []), "summary")),
            settings=dict(_mapping(_get(data, "settings", ""), "settings")),
            days=_each(DriftDay.from_dict, _get(data, "days", ""), "days"),
            events=_each(DriftEvent.from_dict, data.get("events", []), "events"),
            segments=_each(MonitorSegment.from_dict, data.get("segments", []), "segments"),
            samples_needed=_int(_get(data, "samples_needed", ""), "samples_needed"),
            recalibration_window=_int(
                _get(data, "recalibration_window", ""), "recalibration_window"
            ),
            policy=dict(_mapping(data.get("policy", {}), "policy")),
            task=str(data.get("task", "drift")),
            **_provenance(data),
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``results.json`` atomically."""
        return _save(self, path)


AnyResults = DemoResults | DriftResults


# ------------------------------------------------------------------- shared by both files


def _header(results: AnyResults) -> dict[str, Any]:
    """The fields every ``results.json`` starts with: schema, task, title, provenance, summary."""
    return {
        "schema": RESULTS_SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "task": results.task,
        "title": results.title,
        "created": results.created,
        "exitguard_version": results.exitguard_version,
        "machine": dataclasses.asdict(results.machine),
        "summary": list(results.summary),
    }


def _provenance(data: Mapping[str, Any]) -> dict[str, Any]:
    """Where and when results were made, and the task's own ``extra``: read from any file."""
    return {
        "machine": Machine.from_dict(data.get("machine", {})),
        "created": str(data.get("created", "")),
        "exitguard_version": str(data.get("exitguard_version", "")),
        "extra": dict(_mapping(data.get("extra", {}), "extra")),
    }


def _save(results: AnyResults, path: str | os.PathLike[str]) -> Path:
    from exitguard._files import atomic_write_text

    text = json.dumps(results.to_dict(), indent=2, allow_nan=False) + "\n"
    return atomic_write_text(path, text, argument="RESULTS")


def results_from_dict(data: Any) -> DemoResults | DriftResults:
    """Typed results from ``results.json`` content: drift's or any other demo's."""
    data = _mapping(data, "RESULTS")
    if data.get("task") == "drift":
        return DriftResults.from_dict(data)
    return DemoResults.from_dict(data)


# ---------------------------------------------------------------------------- version 1

_SPEED_KEY = re.compile(r"measured speed-up, batch (\d+)")


def upgrade_v1(data: Mapping[str, Any]) -> dict[str, Any]:
    """Version-1 results content as version 2: 0-based mean exits, a typed timed policy.

    Version 1 stored the exits evaluation with the 1-based exit as cost, risk titles in a
    separate ``risk_titles`` map, and the timed policy as a free-form ``timing`` table
    beside an ``exit_histogram``.
    """
    from exitguard.report.plots import default_risk_title

    upgraded = dict(data)
    titles = _mapping(data.get("risk_titles", {}), "risk_titles")
    risks = {}
    for name, value in _mapping(_get(data, "risks", ""), "risks").items():
        value = dict(_mapping(value, f"risks.{str(name)[:40]}"))
        value.setdefault("title", str(titles.get(name) or default_risk_title(str(name))))
        exits = _mapping(_get(value, "evaluation_exits", f"risks.{name}"), "evaluation_exits")
        value["evaluation_exits"] = _zero_based(exits)
        risks[name] = value
    upgraded["risks"] = risks
    histogram = _mapping(_get(data, "exit_histogram", ""), "exit_histogram")
    timing = _mapping(data.get("timing", {}), "timing")
    mean_exit = timing.get("mean exit (1 = first)")
    speeds = []
    measures = []
    for key, value in timing.items():  # a loop over the few rows of the timing table
        if isinstance(value, Mapping):
            continue
        match = _SPEED_KEY.fullmatch(str(key))
        if match and isinstance(value, (int, float)) and not isinstance(value, bool):
            speeds.append({"batch_size": int(match.group(1)), "speedup": value})
        elif key == "measured_speedup" and isinstance(value, (int, float)):
            batch = timing.get("batch_size")
            batch = batch if isinstance(batch, int) and batch >= 1 else 1
            speeds.append({"batch_size": batch, "speedup": value})
        elif key not in ("mean exit (1 = first)", "certified"):
            measures.append([str(key).replace("_", " "), _cell_value(value, f"timing.{key}")])
    threshold = histogram.get("threshold")
    upgraded["timed_policy"] = {
        "procedure": histogram.get("procedure"),
        "risk": histogram.get("risk"),
        "target_risk": histogram.get("target_risk"),
        "threshold": threshold if isinstance(threshold, (int, float)) else None,
        "certified": timing.get("certified"),
        "n_cal": None,
        "n_test": None,
        "unit": "test samples",
        "counted": histogram.get("unit", ""),
        "exit_counts": histogram.get("counts"),
        "mean_exit": mean_exit - 1.0
        if isinstance(mean_exit, (int, float)) and not isinstance(mean_exit, bool)
        else None,
        "flops_saving": None,
        "speeds": speeds,
        "measures": measures,
    }
    upgraded["schema_version"] = SCHEMA_VERSION
    return upgraded


def _zero_based(evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """A version-1 exits evaluation (cost: the 1-based exit) with 0-based mean exits."""
    data = dict(evaluation)
    full = data.get("full_cost")
    if isinstance(full, (int, float)) and not isinstance(full, bool):
        data["full_cost"] = full - 1.0
    rows = []
    for row in _list(_get(data, "rows", "evaluation_exits"), "evaluation_exits.rows"):
        row = dict(_mapping(row, "evaluation_exits.rows[]"))
        cost = row.get("mean_cost")
        if isinstance(cost, (int, float)) and not isinstance(cost, bool):
            row["mean_cost"] = cost - 1.0
        rows.append(row)
    data["rows"] = rows
    return data


# ----------------------------------------------------------------------------- summary


def summary_lines(
    risks: Mapping[str, RiskResult], settings: Settings, timed: TimedPolicy
) -> list[str]:
    """The summary's lines on the timed policy: the mean over splits, then the one run.

    Both lines give the same quantities (mean exit, FLOPs saved), each saying what it is
    (the mean over ``settings.trials`` splits, or the one split that was run and timed); a
    policy slower than its baseline at some batch size gets a line of its own.
    """
    lines = []
    title = risks[timed.risk].title if timed.risk in risks else timed.risk
    flops_row: EvaluationRow | None
    exits_row: EvaluationRow | None
    try:
        flops_row, exits_row = risks[timed.risk].row(timed.procedure, timed.target_risk)
    except KeyError:
        flops_row = exits_row = None
    if flops_row is not None and exits_row is not None:
        saving = flops_row.relative_saving or 0.0
        mean_exit = "–" if exits_row.mean_cost is None else f"{exits_row.mean_cost:.2f}"
        lines.append(
            f"{timed.procedure} on {title} at ε = {timed.target_risk:g} (δ = "
            f"{settings.delta:g}, n = {settings.n_cal}), mean over {settings.trials} random "
            f"calibration/test splits: test risk {flops_row.mean_test_risk:.4f}, population "
            f"violation rate {flops_row.population_violation_rate:.2f}, "
            f"{100 * flops_row.certified_rate:.0f}% of splits certified, mean exit {mean_exit} "
            f"(0-based), {100 * saving:.1f}% of FLOPs saved."
        )
    speeds = "; ".join(
        f"{speed_phrase(s.speedup, baseline=timed.baseline)} at batch {s.batch_size}"
        + ("" if s.predicted is None else f" (its latency profile predicts {s.predicted:.2f}×)")
        for s in timed.speeds
    )
    certified = (
        "certified"
        if timed.certified
        else "not certified: nothing could be certified on that split, so the full model ran"
    )
    parts = [
        (
            f"The one policy run for real ({certified}; calibrated on one split of "
            f"{timed.n_cal if timed.n_cal is not None else '?'} and run on its "
            f"{timed.n_test if timed.n_test is not None else '?'} test {timed.unit}):"
        )
    ]
    if timed.mean_exit is not None:
        parts.append(f"mean exit {timed.mean_exit:.2f},")
    if timed.flops_saving is not None:
        ideal = timed.flops_speedup
        ideal_text = f" (FLOPs-ideal {ideal:.2f}×)" if ideal is not None else ""
        parts.append(f"{100 * timed.flops_saving:.1f}% of FLOPs saved{ideal_text};")
    if speeds:
        parts.append(f"measured {speeds}" + (";" if timed.quality else "."))
    if timed.quality:
        parts.append(f"{timed.quality}.")
    lines.append(" ".join(parts))
    for speed in timed.slower:
        lines.append(
            f"At batch {speed.batch_size} this policy is "
            f"{speed_phrase(speed.speedup, baseline=timed.baseline)}: there the exit heads "
            "and the bookkeeping of early exits cost more than the layers they skip."
        )
    return lines
