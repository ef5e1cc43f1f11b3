"""The exit rule, applied to every sample under every threshold of a grid at once.

Convention (used everywhere in exitguard): exits are 0-based, the last exit is the full model.
Under a threshold ``t`` a sample leaves at the **first exit whose confidence is >= t**; if no
exit qualifies it uses the last exit. A threshold of ``+inf`` means "never exit early", so the
full model is a member of every grid: row 0 of a grid is always ``+inf``, whatever the
confidences are, and the rows that follow grow more aggressive (decreasing thresholds).

A **threshold vector** ``t`` (one threshold per exit but the last, shape ``(L - 1,)``) applies
the same rule exit by exit: a sample leaves at the first exit ``l`` whose confidence is
``>= t[l]``, else at the last exit; ``t[l] = +inf`` disables exit ``l``. A scalar threshold is
the vector that repeats it. :func:`first_exit` is the one implementation of the rule, for
scalars and vectors, numpy arrays and torch tensors alike.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from exitguard.risk._validation import as_float_array, check_int

NEVER = math.inf
"""The threshold of the full model: no confidence reaches it."""


_THRESHOLD_RULE = "a float in [0, 1] or inf (never exit early)"


def check_thresholds(value: Any, *, name: str = "threshold") -> NDArray[np.float64]:
    """Thresholds of any shape as float64, each in [0, 1] or ``+inf`` (the full model).

    The one validation of a threshold in exitguard: NaN, ``-inf``, values outside [0, 1],
    booleans and non-numbers are refused with one message naming ``name``.
    """
    if isinstance(value, bool) or (isinstance(value, np.ndarray) and value.dtype == bool):
        raise TypeError(f"`{name}` must be {_THRESHOLD_RULE}; got {value!r}.")
    try:
        raw = np.asarray(value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"`{name}` must be {_THRESHOLD_RULE}; got {value!r}.") from error
    if raw.dtype.kind not in "iuf":
        raise TypeError(f"`{name}` must be {_THRESHOLD_RULE}; got {value!r}.")
    values = raw.astype(np.float64)
    bad = ~(((values >= 0.0) & (values <= 1.0)) | (values == math.inf))
    if bad.any():
        raise ValueError(f"`{name}` must be {_THRESHOLD_RULE}; got {float(values[bad].flat[0])!r}.")
    return values


def check_threshold(value: Any, *, name: str = "threshold") -> float:
    """One threshold, checked as in :func:`check_thresholds`."""
    values = check_thresholds(value, name=name)
    if values.shape != ():
        raise ValueError(f"`{name}` must be one number; got shape {values.shape}.")
    return float(values)


def first_exit(fires: Any, thresholds: Any = None) -> Any:
    """The exit rule: (..., L - 1) decisions, or confidences and thresholds -> (...,) exits.

    With one argument, ``fires[..., l]`` says whether exit ``l`` (of the exits before the
    last) is confident enough. With ``thresholds``, the first argument holds the confidences
    of the exits before the last, (..., L - 1), and exit ``l`` fires when
    ``confidence[..., l] >= thresholds[..., l]``; ``thresholds`` broadcasts against it: a
    scalar (one threshold for every exit), a vector (L - 1,) (one per exit; ``inf`` disables
    an exit), (..., 1) (one per sample) or (..., L - 1) (per sample and exit).

    The result is the first exit that fires, or ``L - 1`` (the last exit, the full model)
    when none does: the number of leading exits that do not fire. Works on numpy arrays and
    torch tensors alike, so every implementation of early exit (the risk core, real
    skipping, samplers, decoders) applies the same rule.

    Examples
    --------
    >>> first_exit(np.array([[False, True, True], [False, False, False]]))
    array([1, 3])
    >>> first_exit(np.array([[0.5, 0.7], [0.9, 0.2]]), np.array([0.6, 0.6]))
    array([1, 0])
    >>> first_exit(np.array([[0.5, 0.7], [0.9, 0.2]]), np.array([np.inf, 0.6]))
    array([1, 2])
    """
    if thresholds is not None:
        fires = fires >= thresholds  # (..., L-1) broadcast: scalar, per exit, per sample
    return (~fires).cumprod(-1).sum(-1)


def check_threshold_vector(value: Any, n_exits: int, *, name: str = "thresholds") -> Any:
    """One threshold per exit but the last: float64 (L - 1,), each in [0, 1] or ``+inf``.

    Checked as in :func:`check_thresholds`; ``+inf`` disables an exit, and the all-``inf``
    vector is the full model.
    """
    check_int(n_exits, "n_exits", minimum=1)
    values = check_thresholds(value, name=name)
    if values.shape != (n_exits - 1,):
        raise ValueError(
            f"`{name}` must hold one threshold per exit but the last: shape ({n_exits - 1},) "
            f"for {n_exits} exits; got shape {values.shape}."
        )
    return values


def default_thresholds(step: float = 0.01) -> NDArray[np.float64]:
    """The default grid: ``[inf, 1.00, 1 - step, ..., 0.00]`` (row 0 is the full model)."""
    if not (0.0 < step <= 0.5):
        raise ValueError(f"`step` must be a float in (0, 0.5]; got {step!r}.")
    count = round(1.0 / step)
    grid = np.round(np.linspace(1.0, 0.0, count + 1), 12)
    return np.concatenate([[NEVER], grid])


def as_threshold_grid(thresholds: ArrayLike | None) -> NDArray[np.float64]:
    """Validate a user grid and make sure it starts with the full model (``+inf``).

    A grid must be strictly decreasing; values other than the leading ``+inf`` must lie in
    [0, 1]. ``None`` gives :func:`default_thresholds`.
    """
    if thresholds is None:
        return default_thresholds()
    grid = np.asarray(thresholds, dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0:
        raise ValueError(f"`thresholds` must be a non-empty 1-D array; got shape {grid.shape}.")
    if grid[0] != NEVER:
        grid = np.concatenate([[NEVER], grid])
    return check_threshold_grid(grid)


def check_threshold_grid(grid: NDArray[np.float64]) -> NDArray[np.float64]:
    """``grid`` (K,) if it is a grid of thresholds: strictly decreasing, in [0, 1], where only
    row 0 may be ``+inf`` (never exit early, the full model).

    NaN, ``-inf`` and values outside [0, 1] are refused, since a policy must be applicable
    with its threshold.
    """
    finite = grid[1:] if grid.size and grid[0] == NEVER else grid
    if np.isnan(grid).any() or not np.all(np.isfinite(finite)):
        raise ValueError(
            "`thresholds` must be finite numbers in [0, 1], not NaN (only row 0 may be inf, the "
            f"full model); got {np.array2string(grid[:6], precision=3)}..."
        )
    if finite.size and (finite.min() < 0.0 or finite.max() > 1.0):
        raise ValueError(
            "`thresholds` must lie in [0, 1] (only row 0 may be inf, the full model); got "
            f"values in [{finite.min():g}, {finite.max():g}]."
        )
    if np.any(np.diff(grid) >= 0):
        raise ValueError(
            "`thresholds` must be strictly decreasing (row 0 the full model, the most aggressive "
            f"last); got {np.array2string(grid[:6], precision=3)}..."
        )
    return grid


def exit_indices(confidences: ArrayLike, thresholds: ArrayLike | None = None) -> NDArray[np.int64]:
    """Exit taken by every sample under every threshold.

    Parameters
    ----------
    confidences : array of shape (n, L)
        Confidence of each sample at each exit, in [0, 1]. The last exit's confidence is
        ignored: a sample that reaches it always stops there.
    thresholds : array of shape (K,), optional
        A strictly decreasing grid; ``+inf`` is put in front when missing.
        Defaults to :func:`default_thresholds`.

    Returns
    -------
    exits : int array of shape (K, n)
        ``exits[k, i]`` is the 0-based exit of sample ``i`` under ``thresholds[k]``:
        the first exit ``l`` with ``confidences[i, l] >= thresholds[k]``, else ``L - 1``.
        Row 0 is ``L - 1`` for every sample.

    Examples
    --------
    >>> exit_indices([[0.2, 0.9, 0.5], [0.95, 0.1, 0.3]], [0.9, 0.0])
    array([[2, 2],
           [1, 0],
           [0, 0]])
    """
    conf = as_float_array(confidences, "confidences", ndim=2)  # (n, L)
    n_exits = check_int(conf.shape[1], "confidences.shape[1] (the number of exits)", minimum=1)
    grid = as_threshold_grid(thresholds)  # (K,)
    # Only exits before the last can fire early; the last exit is the fallback.  (K, n)
    return first_exit(conf[None, :, : n_exits - 1], grid[:, None, None]).astype(np.int64)


def exit_index(confidences: ArrayLike, threshold: float | ArrayLike) -> NDArray[np.int64]:
    """Exit of every sample under one threshold, or one threshold vector (L - 1,); shape (n,).

    Examples
    --------
    >>> exit_index([[0.2, 0.9, 0.5], [0.95, 0.1, 0.3]], 0.9)
    array([1, 0])
    >>> exit_index([[0.2, 0.9, 0.5], [0.95, 0.1, 0.3]], [math.inf, 0.5])
    array([1, 2])
    """
    conf = as_float_array(confidences, "confidences", ndim=2)  # (n, L)
    if np.ndim(threshold) == 0:
        limit: Any = check_threshold(threshold)
    else:
        limit = check_threshold_vector(threshold, conf.shape[1], name="threshold")  # (L-1,)
    return first_exit(conf[:, :-1], limit).astype(np.int64)  # (n,)
