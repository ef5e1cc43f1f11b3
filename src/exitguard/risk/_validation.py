"""Shared argument checks. Every message names the argument, what is allowed and what was given."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape} and dtype {value.dtype}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_NUMERIC_KINDS = frozenset("biuf")
_KIND_NAMES = {
    "c": "complex",
    "M": "datetime",
    "m": "timedelta",
    "U": "strings",
    "S": "bytes",
    "O": "Python objects",
    "V": "structured or raw bytes",
}


def as_float_array(
    value: ArrayLike, name: str, *, ndim: int | tuple[int, ...], finite: bool = True
) -> NDArray[np.float64]:
    """Convert to a finite float64 array with the given number of dimensions.

    Only booleans, integers and real floats are numbers here: complex, datetime, string,
    structured and object arrays are refused rather than silently converted (numpy would drop
    imaginary parts and parse numeric strings).
    """
    try:
        raw = np.asarray(value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"`{name}` must be numeric array-like; got {_describe(value)}.") from error
    if raw.dtype.kind not in _NUMERIC_KINDS:
        raise TypeError(
            f"`{name}` must hold real numbers (bool, integer or float); got dtype {raw.dtype} "
            f"({_KIND_NAMES.get(raw.dtype.kind, 'non-numeric')})."
        )
    array = raw.astype(np.float64, copy=False)
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if array.ndim not in allowed:
        shapes = " or ".join(f"{d}-D" for d in allowed)
        raise ValueError(f"`{name}` must be {shapes}; got shape {array.shape}.")
    if finite and not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise ValueError(f"`{name}` must be finite; got {bad} NaN or infinite entries.")
    return array


def check_open_unit(value: Any, name: str) -> float:
    """A float strictly inside (0, 1), such as a target risk or delta."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"`{name}` must be a float in (0, 1); got {_describe(value)}.")
    number = float(value)
    if not (0.0 < number < 1.0):
        raise ValueError(f"`{name}` must be a float in (0, 1); got {number!r}.")
    return number


def check_open_unit_list(values: float | Iterable[float], name: str) -> NDArray[np.float64]:
    """One or more floats in (0, 1), returned as a 1-D float64 array."""
    items = [values] if np.isscalar(values) else list(values)  # type: ignore[list-item,arg-type]
    if not items:
        raise ValueError(f"`{name}` must hold at least one value in (0, 1); got an empty list.")
    return np.array([check_open_unit(v, name) for v in items], dtype=np.float64)


def check_positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"`{name}` must be a positive float; got {_describe(value)}.")
    number = float(value)
    if not (np.isfinite(number) and number > 0):
        raise ValueError(f"`{name}` must be a positive finite float; got {number!r}.")
    return number


def check_indices(values: ArrayLike, name: str, *, size: int, of: str) -> NDArray[np.integer]:
    """An integer array of indices into ``size`` items (``of``, e.g. "exit", "sample")."""
    array = np.asarray(values)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"`{name}` must hold integer {of} indices; got dtype {array.dtype}.")
    if array.size and (array.min() < 0 or array.max() >= size):
        raise ValueError(
            f"`{name}` must hold {of} indices in [0, {size - 1}] ({size} {of}s); got values "
            f"in [{array.min()}, {array.max()}]."
        )
    return array


def check_int(value: Any, name: str, *, minimum: int = 1, allow_none: bool = False) -> Any:
    """``value`` as an int if it is an integer >= ``minimum`` (or None when allowed).

    Booleans and floats are refused, even integral ones: a count given as ``True`` or 2.0 is
    a mistake upstream. A wrong type is a TypeError, a wrong value a ValueError.

    >>> check_int(3, "epochs")
    3
    >>> check_int(0, "epochs")
    Traceback (most recent call last):
    ...
    ValueError: `epochs` must be a positive integer; got 0.
    """
    if value is None and allow_none:
        return None
    what = {1: "a positive integer", 0: "a non-negative integer"}.get(
        minimum, f"an integer >= {minimum}"
    )
    what += " or None" if allow_none else ""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be {what}; got {_describe(value)}.")
    if int(value) < minimum:
        raise ValueError(f"`{name}` must be {what}; got {int(value)}.")
    return int(value)


def check_ints(owner: Any, names: Iterable[str], *, minimum: int = 1) -> None:
    """:func:`check_int` on the attributes ``names`` of ``owner`` (a settings dataclass)."""
    for name in names:
        check_int(getattr(owner, name), name, minimum=minimum)


def check_choice(value: Any, name: str, allowed: Iterable[str]) -> str:
    options = tuple(allowed)
    if not isinstance(value, str) or value not in options:
        listed = ", ".join(repr(o) for o in options)
        raise ValueError(f"`{name}` must be one of {listed}; got {_describe(value)}.")
    return value


def check_loss_range(losses: NDArray[np.float64], loss_bound: float, name: str = "losses") -> None:
    """Losses must lie in [-B, B]; a tiny tolerance absorbs float rounding."""
    tolerance = 1e-12 * max(1.0, loss_bound)
    low, high = float(losses.min(initial=0.0)), float(losses.max(initial=0.0))
    if low < -loss_bound - tolerance or high > loss_bound + tolerance:
        raise ValueError(
            f"`{name}` must lie in [-loss_bound, loss_bound] = [{-loss_bound:g}, {loss_bound:g}]; "
            f"got values in [{low:.6g}, {high:.6g}]. Pass the right `loss_bound` "
            "(1 for 0-1 losses, 2 for Brier summed over classes)."
        )


def check_probabilities(probs: NDArray[np.float64], name: str, *, atol: float = 1e-4) -> None:
    """Last axis must be a probability distribution."""
    if probs.size and (probs.min() < -atol or probs.max() > 1 + atol):
        raise ValueError(
            f"`{name}` must hold probabilities in [0, 1] along the last axis; got values in "
            f"[{probs.min():.6g}, {probs.max():.6g}]. Pass logits with `from_logits=True`."
        )
    sums = probs.sum(axis=-1)
    worst = float(np.max(np.abs(sums - 1.0), initial=0.0))
    if worst > atol:
        raise ValueError(
            f"`{name}` must sum to 1 over classes (the last axis); the worst row sums to "
            f"{1.0 + worst:.6g} or {1.0 - worst:.6g}. Pass logits with `from_logits=True`."
        )


def check_class_indices(
    values: ArrayLike, name: str, *, shape: tuple[int, ...], n_classes: int | None = None
) -> NDArray[np.int64]:
    """Integer class indices of the given shape, >= 0 and below ``n_classes`` when known."""
    array = np.asarray(values)
    if array.shape != shape:
        raise ValueError(
            f"`{name}` must have shape {shape} to match the outputs; got {array.shape}."
        )
    if not np.issubdtype(array.dtype, np.integer):
        if (
            np.issubdtype(array.dtype, np.floating)
            and np.all(np.isfinite(array))
            and np.all(array == np.round(array))
        ):
            array = array.astype(np.int64)
        else:
            raise TypeError(f"`{name}` must hold integer class indices; got dtype {array.dtype}.")
    if array.size and array.min() < 0:
        raise ValueError(f"`{name}` must hold class indices >= 0; got a minimum of {array.min()}.")
    if n_classes is not None and array.size and array.max() >= n_classes:
        raise ValueError(
            f"`{name}` must lie in [0, {n_classes - 1}] (the number of classes is {n_classes}); "
            f"got values in [{array.min()}, {array.max()}]."
        )
    return array.astype(np.int64)


def check_labels(labels: ArrayLike, name: str, *, n: int, n_classes: int) -> NDArray[np.int64]:
    return check_class_indices(labels, name, shape=(n,), n_classes=n_classes)


def check_unit_scores(values: ArrayLike, name: str, *, ndim: int) -> NDArray[np.float64]:
    """Finite scores in [0, 1], such as saved confidences."""
    array = as_float_array(values, name, ndim=ndim)
    if array.size and (array.min() < 0.0 or array.max() > 1.0):
        raise ValueError(
            f"`{name}` must lie in [0, 1] (higher = safer to stop); got values in "
            f"[{array.min():.6g}, {array.max():.6g}]."
        )
    return array


def check_exit_cost(exit_cost: ArrayLike | None, n_exits: int) -> NDArray[np.float64]:
    """Cost of stopping at each exit (L,), finite and >= 0; default: exits evaluated (1..L)."""
    if exit_cost is None:
        return np.arange(1, n_exits + 1, dtype=np.float64)
    per_exit_cost = as_float_array(exit_cost, "exit_cost", ndim=1)
    if per_exit_cost.shape != (n_exits,):
        raise ValueError(
            f"`exit_cost` must have shape ({n_exits},), one value per exit; "
            f"got {per_exit_cost.shape}."
        )
    if per_exit_cost.min() < 0:
        raise ValueError(
            f"`exit_cost` must be >= 0 (compute spent up to each exit); got a minimum of "
            f"{per_exit_cost.min():g}."
        )
    return per_exit_cost
