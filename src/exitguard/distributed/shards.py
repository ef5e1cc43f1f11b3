"""Shards: the results of one work item on disk, as npz (no pickle), readable without Ray.

A distributed run writes one shard per finished work item into a *shard folder*, next to a
``run.json`` that describes the run. A rerun with the same folder and the same description
computes only the items whose shard is missing (resume); the merge reads every shard of the
folder (:mod:`exitguard.distributed.merge`).

File format ``exitguard.shard/1`` (``<item>.npz``, written by ``numpy.savez``, read with
``numpy.load(path, allow_pickle=False)``):

- ``sample_ids``: int64 (b,), the samples the shard holds;
- ``rows``: int64 (k,), the configurations (grid rows) it holds; absent for per-sample
  outputs (a collection), present for tables (a sweep);
- ``meta``: a 0-d string, JSON: ``format``, ``run`` (the run key), ``item`` (the work item id),
  ``seconds`` (compute time on the worker) and ``worker`` (host and process id);
- every other key is a data array whose leading axes are (b, ...) for per-sample outputs or
  (k, b, ...) for tables.

``run.json`` holds ``format`` (``exitguard.shards/1``), ``run`` (a hash of the description),
``description`` (JSON: what is computed, from which model weights, data, seed and grid) and
``items`` (the ids of all work items of the run).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

SHARD_FORMAT = "exitguard.shard/1"
RUN_FORMAT = "exitguard.shards/1"
RESERVED = ("sample_ids", "rows", "meta")
_ITEM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class ShardFileError(ValueError):
    """A shard or ``run.json`` that cannot be read, or that belongs to another run."""


def check_item_id(item: Any) -> str:
    """``item`` if it is a valid work item id (letters, digits, ``_.-``; it names a file)."""
    if not isinstance(item, str) or not _ITEM_ID.match(item):
        raise ValueError(
            "a work item id must be 1-100 letters, digits, '_', '.' or '-', starting with a "
            f"letter or digit; got {item!r}."
        )
    return item


def _ids(values: ArrayLike, name: str) -> NDArray[np.int64]:
    array = np.asarray(values)
    if array.ndim != 1 or not (array.size == 0 or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(
            f"`{name}` must be a 1-D integer array; got shape {array.shape} and dtype "
            f"{array.dtype}."
        )
    return array.astype(np.int64, copy=False)


@dataclasses.dataclass(frozen=True, repr=False)
class Shard:
    """The results of one work item.

    Attributes
    ----------
    item : str
        The work item id (the file is ``<item>.npz``).
    sample_ids : int64 array of shape (b,)
    arrays : mapping of str to arrays
        Leading axes (b, ...) when ``rows`` is None, else (k, b, ...).
    rows : int64 array of shape (k,) or None
        The configurations (grid rows) the shard holds; None for per-sample outputs.
    meta : dict
        JSON-ready: the run key, compute seconds, worker.
    """

    item: str
    sample_ids: NDArray[np.int64]
    arrays: Mapping[str, NDArray[Any]]
    rows: NDArray[np.int64] | None = None
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        check_item_id(self.item)
        ids = _ids(self.sample_ids, "sample_ids")
        object.__setattr__(self, "sample_ids", ids)
        rows = None if self.rows is None else _ids(self.rows, "rows")
        object.__setattr__(self, "rows", rows)
        lead = (ids.size,) if rows is None else (rows.size, ids.size)
        arrays = {}
        for name, value in self.arrays.items():  # a loop over the few arrays
            if name in RESERVED:
                raise ValueError(f"array name {name!r} is reserved; choose another.")
            array = np.asarray(value)
            if array.dtype == object:
                raise TypeError(f"array {name!r} has dtype object; shards hold no pickles.")
            if array.shape[: len(lead)] != lead:
                axes = "(b, ...)" if rows is None else "(k, b, ...)"
                raise ValueError(
                    f"array {name!r} of item {self.item!r} must have leading axes {axes} = "
                    f"{lead}; got shape {array.shape}."
                )
            arrays[name] = array
        object.__setattr__(self, "arrays", arrays)
        object.__setattr__(self, "meta", dict(self.meta))

    def __repr__(self) -> str:
        rows = "" if self.rows is None else f", rows={self.rows.size}"
        return (
            f"Shard(item={self.item!r}, samples={self.sample_ids.size}{rows}, "
            f"arrays={sorted(self.arrays)})"
        )

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``<folder>/<item>.npz`` atomically (a temporary file, then a rename)."""
        target = Path(folder) / f"{self.item}.npz"
        temporary = target.with_name(f".{target.name}.tmp")
        payload: dict[str, Any] = {
            "sample_ids": self.sample_ids,
            "meta": np.str_(json.dumps({"format": SHARD_FORMAT, **self.meta}, sort_keys=True)),
            **self.arrays,
        }
        if self.rows is not None:
            payload["rows"] = self.rows
        with temporary.open("wb") as handle:
            np.savez(handle, **payload)
        os.replace(temporary, target)
        return target

    @staticmethod
    def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
        """The ``meta`` of a shard file without reading its arrays."""
        source = Path(path)
        try:
            with np.load(source, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
        except (OSError, ValueError, KeyError, EOFError, json.JSONDecodeError) as error:
            raise ShardFileError(f"{source} is not a readable shard ({error}).") from error
        if not isinstance(meta, dict) or meta.get("format") != SHARD_FORMAT:
            raise ShardFileError(
                f"{source} is not a shard: `meta.format` must be {SHARD_FORMAT!r}."
            )
        return meta

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Shard:
        """Read a shard file; :class:`ShardFileError` when it is not one."""
        source = Path(path)
        try:
            with np.load(source, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                arrays = {key: data[key] for key in data.files if key not in RESERVED}
                ids = data["sample_ids"]
                rows = data["rows"] if "rows" in data.files else None
        except (OSError, ValueError, KeyError, EOFError, json.JSONDecodeError) as error:
            raise ShardFileError(f"{source} is not a readable shard ({error}).") from error
        if not isinstance(meta, dict) or meta.get("format") != SHARD_FORMAT:
            raise ShardFileError(
                f"{source} is not a shard: `meta.format` must be {SHARD_FORMAT!r}."
            )
        meta.pop("format")
        item = meta.get("item", source.stem)
        try:
            return cls(item=item, sample_ids=ids, arrays=arrays, rows=rows, meta=meta)
        except (TypeError, ValueError) as error:
            raise ShardFileError(f"{source}: {error}") from error


def run_key(description: Mapping[str, Any]) -> str:
    """A short hash of a run description (canonical JSON)."""
    text = json.dumps(description, sort_keys=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [key for key in keys if old.get(key) != new.get(key)]


class ShardStore:
    """A shard folder: ``run.json`` plus one ``<item>.npz`` per finished work item.

    Parameters
    ----------
    folder : path
        Created when missing.
    description : mapping, optional
        The run (JSON-ready). A new folder records it; a folder that holds another run is
        refused with a :class:`ShardFileError` naming the differing entries. Without it the
        folder must exist (read-only use, e.g. merging).
    items : sequence of str, optional
        The ids of all work items of the run, recorded with the description.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        description: Mapping[str, Any] | None = None,
        items: Sequence[str] | None = None,
    ) -> None:
        self.folder = Path(folder)
        manifest = self.folder / "run.json"
        if description is None:
            self.description, self.items = self._read_manifest(manifest)
            self.run = run_key(self.description)
            return
        canonical = json.loads(json.dumps(dict(description), allow_nan=False))
        self.description = canonical
        self.run = run_key(canonical)
        self.items = [check_item_id(item) for item in (items or [])]
        if manifest.is_file():
            recorded, _ = self._read_manifest(manifest)
            if recorded != canonical:
                raise ShardFileError(
                    f"the shard folder {self.folder} holds another run (it differs in "
                    f"{_differences(recorded, canonical)}); use a new folder, or delete this "
                    "one to start over."
                )
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps(
            {
                "format": RUN_FORMAT,
                "run": self.run,
                "description": canonical,
                "items": self.items,
            },
            indent=1,
            sort_keys=True,
        )
        temporary = self.folder / ".run.json.tmp"
        temporary.write_text(text + "\n", encoding="utf-8")
        os.replace(temporary, manifest)

    @staticmethod
    def _read_manifest(path: Path) -> tuple[dict[str, Any], list[str]]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ShardFileError(f"cannot read {path} ({error}).") from error
        if not isinstance(data, dict) or data.get("format") != RUN_FORMAT:
            raise ShardFileError(f"{path} is not a shard folder's run.json ({RUN_FORMAT}).")
        return dict(data["description"]), list(data.get("items", []))

    def __repr__(self) -> str:
        return f"ShardStore({str(self.folder)!r}, run={self.run!r}, done={len(self.done())})"

    def path(self, item: str) -> Path:
        return self.folder / f"{check_item_id(item)}.npz"

    def write(self, shard: Shard) -> Path:
        """Save ``shard`` after recording this run's key in its meta."""
        meta = {**shard.meta, "run": self.run, "item": shard.item}
        return dataclasses.replace(shard, meta=meta).save(self.folder)

    def read(self, item: str) -> Shard:
        """The shard of ``item``; :class:`ShardFileError` when missing, unreadable or foreign."""
        return self._check(Shard.load(self.path(item)), self.path(item))

    def _check(self, shard: Shard, path: Path) -> Shard:
        if shard.meta.get("run") != self.run:
            raise ShardFileError(
                f"{path} belongs to run {shard.meta.get('run')!r}, not to this folder's run "
                f"{self.run!r}; remove it."
            )
        return shard

    def done(self) -> set[str]:
        """Ids of the items whose shard file exists (not yet read)."""
        return {path.stem for path in self.folder.glob("*.npz") if _ITEM_ID.match(path.stem)}

    def finished(self, items: Sequence[str]) -> tuple[set[str], dict[str, str]]:
        """Which of ``items`` have a readable shard of this run, and why the others that have
        a file do not (to compute them again)."""
        present = self.done()
        good: set[str] = set()
        bad: dict[str, str] = {}
        for item in items:  # a loop over files: each is opened once
            if item not in present:
                continue
            path = self.path(item)
            try:
                meta = Shard.read_meta(path)
            except ShardFileError as error:
                bad[item] = str(error)
                continue
            if meta.get("run") != self.run or meta.get("item") != item:
                bad[item] = f"{path} belongs to another run or item"
                continue
            good.add(item)
        return good, bad

    def shards(self) -> list[Shard]:
        """Every shard file of the folder, sorted by name (foreign ones refused)."""
        paths = sorted(self.folder.glob("*.npz"))
        return [self._check(Shard.load(path), path) for path in paths]
