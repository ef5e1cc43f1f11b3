"""Exact merge of shards by sample id: each (configuration, sample) exactly once.

Calibration assumes that the calibration samples are exchangeable with the test data, and
the risk is a mean over them. A sample counted twice (e.g. the padding a distributed sampler
adds to even out the ranks) changes the weights of the mean and breaks exchangeability; a
missing sample (a failed block) biases the risk towards the samples that survived. So the
merge never averages, drops or pads: it refuses duplicates, holes and foreign ids with a
:class:`MergeError` naming them.

Numpy only; the shards may come from :mod:`exitguard.distributed` or from anywhere else
(:class:`~exitguard.distributed.shards.Shard` takes plain arrays).

Examples
--------
>>> import numpy as np
>>> from exitguard.distributed.shards import Shard
>>> parts = [Shard("a", [2, 0], {"x": np.array([20.0, 0.0])}),
...          Shard("b", [1], {"x": np.array([10.0])})]
>>> merge_samples(parts, sample_ids=[0, 1, 2])["x"].tolist()
[0.0, 10.0, 20.0]
>>> merge_samples(parts[:1], sample_ids=[0, 1, 2])
Traceback (most recent call last):
...
exitguard.distributed.merge.MergeError: merge refused: 1 sample is missing (...): sample 1. ...
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from exitguard.distributed.shards import Shard
from exitguard.risk._validation import check_int

_SHOWN = 8


class MergeError(ValueError):
    """Shards that do not cover each (configuration, sample) exactly once.

    Attributes
    ----------
    duplicates : int array of shape (m, 2)
        (row, sample id) pairs held by more than one shard (row 0 for per-sample outputs).
    missing : int array of shape (m, 2)
        (row, sample id) pairs held by no shard.
    unexpected : dict of str to list of int
        Per shard (item id), the sample ids that are not part of the run.
    """

    def __init__(
        self,
        message: str,
        *,
        duplicates: NDArray[np.int64],
        missing: NDArray[np.int64],
        unexpected: dict[str, list[int]],
    ) -> None:
        super().__init__(message)
        self.duplicates = duplicates
        self.missing = missing
        self.unexpected = unexpected


def unique_sample_ids(sample_ids: ArrayLike) -> NDArray[np.int64]:
    """``sample_ids`` as int64, checked: a non-empty 1-D integer array without repeats."""
    ids = np.asarray(sample_ids)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"`sample_ids` must be a non-empty 1-D integer array; got shape {ids.shape} and "
            f"dtype {ids.dtype}."
        )
    values, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(
            f"`sample_ids` must be unique; these repeat: {values[counts > 1][:_SHOWN].tolist()}."
        )
    return ids.astype(np.int64)


def _plural(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def _pairs_text(pairs: NDArray[np.int64], *, table: bool) -> str:
    shown = [
        f"(row {row}, sample {sample})" if table else f"sample {sample}"
        for row, sample in pairs[:_SHOWN].tolist()
    ]
    more = f" and {len(pairs) - _SHOWN} more" if len(pairs) > _SHOWN else ""
    return ", ".join(shown) + more


def _merge(
    shards: Sequence[Shard], sample_ids: ArrayLike, n_rows: int | None
) -> dict[str, NDArray[Any]]:
    table = n_rows is not None
    expected = unique_sample_ids(sample_ids)  # (n,)
    order = np.argsort(expected, kind="stable")
    sorted_ids = expected[order]
    n, r = expected.size, (n_rows if table else 1)
    check_int(r, "n_rows")
    if not shards:
        raise ValueError("`shards` must hold at least one shard; got none.")
    count = np.zeros((r, n), dtype=np.int64)  # (R, n) how often each pair is held
    placed: list[tuple[Shard, NDArray[np.int64], NDArray[np.int64]]] = []
    unexpected: dict[str, list[int]] = {}
    names = sorted(shards[0].arrays)
    for shard in shards:  # a loop over shards: each is placed once
        if not isinstance(shard, Shard):
            raise TypeError(f"`shards` must hold Shard objects; got {type(shard).__name__}.")
        if table and shard.rows is None:
            raise ValueError(f"shard {shard.item!r} holds per-sample outputs, not table rows.")
        if not table and shard.rows is not None:
            raise ValueError(f"shard {shard.item!r} holds table rows, not per-sample outputs.")
        if sorted(shard.arrays) != names:
            raise ValueError(
                f"shard {shard.item!r} holds arrays {sorted(shard.arrays)}; shard "
                f"{shards[0].item!r} holds {names}."
            )
        rows = np.zeros(1, dtype=np.int64) if shard.rows is None else shard.rows  # (k,)
        if (rows < 0).any() or (rows >= r).any() or np.unique(rows).size != rows.size:
            raise ValueError(
                f"shard {shard.item!r} holds rows {rows.tolist()}; rows must be distinct and "
                f"in [0, {r - 1}]."
            )
        slot = np.clip(np.searchsorted(sorted_ids, shard.sample_ids), 0, n - 1)  # (b,)
        known = sorted_ids[slot] == shard.sample_ids  # (b,)
        if not known.all():
            unexpected[shard.item] = shard.sample_ids[~known].tolist()
        position = order[slot[known]]  # (b',) columns of the known samples
        np.add.at(count, (rows[:, None], position[None, :]), 1)
        placed.append((shard, rows, order[slot]))
    duplicates = np.argwhere(count > 1)  # (m, 2) (row, column)
    missing = np.argwhere(count == 0)  # (m, 2)
    duplicates[:, 1] = expected[duplicates[:, 1]]
    missing[:, 1] = expected[missing[:, 1]]
    if len(duplicates) or len(missing) or unexpected:
        pair, pairs = ("pair", "pairs") if table else ("sample", "samples")
        problems = []
        if len(duplicates):
            holders = []
            for row, sample in duplicates[:3].tolist():  # a few pairs, for the message only
                held = [
                    shard.item
                    for shard, rows, _ in placed
                    if row in rows and sample in shard.sample_ids
                ]
                where = f"(row {row}, sample {sample})" if table else f"sample {sample}"
                holders.append(f"{where} in items {', '.join(held)}")
            problems.append(
                f"{_plural(len(duplicates), pair, pairs)} "
                f"{'appears' if len(duplicates) == 1 else 'appear'} more than once (a duplicate "
                f"breaks exchangeability): {'; '.join(holders)}"
                + (f"; {len(duplicates) - 3} more" if len(duplicates) > 3 else "")
            )
        if unexpected:
            listed = "; ".join(
                f"item {item}: {ids[:_SHOWN]}" for item, ids in list(unexpected.items())[:3]
            )
            problems.append(f"shards hold sample ids that are not part of the run: {listed}")
        if len(missing):
            problems.append(
                f"{_plural(len(missing), pair, pairs)} "
                f"{'is' if len(missing) == 1 else 'are'} missing (a hole biases the risk): "
                f"{_pairs_text(missing, table=table)}. Compute them (rerun with the same shard "
                "folder to resume)"
            )
        raise MergeError(
            "merge refused: " + "; ".join(problems) + ".",
            duplicates=duplicates,
            missing=missing,
            unexpected=unexpected,
        )
    out: dict[str, NDArray[Any]] = {}
    first = shards[0]
    for name in names:  # a loop over the few arrays
        lead = 1 if first.rows is None else 2
        trail = first.arrays[name].shape[lead:]
        dtype = first.arrays[name].dtype
        for shard, _, _ in placed:  # a loop over shards: check before allocating
            array = shard.arrays[name]
            if array.shape[lead:] != trail or array.dtype != dtype:
                raise ValueError(
                    f"array {name!r} of shard {shard.item!r} has trailing shape "
                    f"{array.shape[lead:]} and dtype {array.dtype}; shard {first.item!r} has "
                    f"{trail} and {dtype}."
                )
        merged = np.empty((r, n, *trail), dtype=dtype)  # (R, n, ...)
        for shard, rows, position in placed:  # a loop over shards: each written once
            values = shard.arrays[name]
            merged[rows[:, None], position[None, :]] = values if table else values[None]
        out[name] = merged if table else merged[0]
    return out


def merge_samples(shards: Sequence[Shard], *, sample_ids: ArrayLike) -> dict[str, NDArray[Any]]:
    """Join per-sample shards into arrays ordered like ``sample_ids``.

    Parameters
    ----------
    shards : sequence of Shard
        Per-sample shards (``rows`` None), all with the same array names, dtypes and
        trailing shapes.
    sample_ids : int array of shape (n,)
        The run's samples, unique; the output follows this order.

    Returns
    -------
    dict of str to arrays of shape (n, ...)

    Raises
    ------
    MergeError
        When a sample is held by more than one shard, by none, or a shard holds an id that
        is not in ``sample_ids``; the message names them (and the items holding duplicates).
    """
    return _merge(shards, sample_ids, None)


def merge_table(
    shards: Sequence[Shard], *, sample_ids: ArrayLike, n_rows: int
) -> dict[str, NDArray[Any]]:
    """Join table shards into (K, n, ...) arrays: each (row, sample) exactly once.

    Parameters
    ----------
    shards : sequence of Shard
        Table shards (``rows`` set): a shard holds rows ``rows`` of samples ``sample_ids``.
    sample_ids : int array of shape (n,)
        The run's samples, unique; the output's columns follow this order.
    n_rows : int
        K, the number of configurations (grid rows).

    Returns
    -------
    dict of str to arrays of shape (K, n, ...)

    Raises
    ------
    MergeError
        When a (row, sample) pair is held twice, by none, or a shard holds a foreign id.
    """
    return _merge(shards, sample_ids, n_rows)
