"""Report folders that hold one run: written in a fresh folder, then swapped into place.

A report folder holds the files of exactly one run. :func:`publish` writes every file into
a fresh folder beside the target (created by ``tempfile.mkdtemp``: an unpredictable name,
mode 0700), then swaps it into place, so a reader sees the old report or the new one, never
a mix, and no file of an earlier run is left behind.

A manifest (``.exitguard-report.json``) lists the files a report wrote, split into the
page's files (``index.html``, pictures, ``results.json``) and data files (loss tables,
per-exit outputs, the policy). What it does not list belongs to the user:

* A target that does not exist, or that holds only the files of an earlier report, is
  replaced as a whole (the earlier folder is renamed aside, the fresh one renamed in, the
  earlier one deleted).
* A target holding anything else (your own files, links, folders) is never replaced: the
  fresh files are moved into it one by one (``os.replace``, atomic per file) and the files
  the earlier report listed that this one does not write are deleted (regular files only).

Links are never followed: a link or special file at one of the report's names is refused
before anything is written, a link named in an earlier manifest is left alone, and the
earlier folder is deleted with :func:`shutil.rmtree`, which removes links without
following them. A failed write removes the fresh folder and leaves the target as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

from exitguard._files import (
    FileSafetyError,
    atomic_write,
    atomic_write_text,
    check_write_target,
    load_json,
)

MANIFEST = ".exitguard-report.json"
MANIFEST_SCHEMA = "exitguard.ReportFolder"

Writer = Callable[[IO[bytes]], Any] | bytes
"""What a file is written from: bytes, or a function that writes a binary handle."""


def _manifest(folder: Path) -> dict[str, list[str]] | None:
    """The earlier report's files in ``folder`` ({"page": [...], "data": [...]}), or None."""
    path = folder / MANIFEST
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return _legacy_manifest(folder)
    if not stat.S_ISREG(info.st_mode):
        return None
    try:
        data = load_json(path, max_bytes=1 << 20, max_depth=4, argument="report folder")
    except (ValueError, OSError):
        return None
    if not isinstance(data, dict) or data.get("schema") != MANIFEST_SCHEMA:
        return None
    found: dict[str, list[str]] = {}
    for kind in ("page", "data"):
        names = data.get(kind, [])
        found[kind] = [n for n in names if isinstance(n, str) and _plain_name(n)]
    return found


def _legacy_manifest(folder: Path) -> dict[str, list[str]] | None:
    """The files of a report written before manifests (from its results.json), or None."""
    results = folder / "results.json"
    try:
        info = os.lstat(results)
        if not stat.S_ISREG(info.st_mode):
            return None
        data = load_json(results, max_bytes=256 << 20, max_depth=32, argument="report folder")
    except (ValueError, OSError):
        return None
    if not isinstance(data, dict) or data.get("schema") != "exitguard.DemoResults":
        return None
    from exitguard.report.drift import DRIFT_PLOTS
    from exitguard.report.plots import PLOTS

    page = ["results.json", "index.html", *PLOTS, *DRIFT_PLOTS]
    for spec in data.get("figures", []) if isinstance(data.get("figures"), list) else []:
        name = spec.get("file") if isinstance(spec, dict) else None
        if isinstance(name, str) and _plain_name(name):
            page.append(name)
    return {"page": page, "data": []}


def _plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")


def _entries(folder: Path) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except FileNotFoundError:
        return []


def _is_cwd_or_above(folder: Path) -> bool:
    here = Path.cwd().resolve()
    there = folder.resolve()
    return here == there or there in here.parents


def _check_folder(target: Path) -> None:
    """Refuse a target that exists and is not a folder (a device, a FIFO, a file)."""
    try:
        info = os.stat(target)  # a link to a folder the caller named is followed
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(info.st_mode):
        kind = "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else None
        kind = kind or ("a FIFO" if stat.S_ISFIFO(info.st_mode) else "not a folder")
        raise FileSafetyError(
            f"out: {target} is {kind}; a report is a folder of files (give a new or existing "
            "folder)."
        )


def publish(
    target: str | os.PathLike[str],
    page: Mapping[str, Writer],
    data: Mapping[str, Writer] | None = None,
) -> Path:
    """Make ``target`` hold exactly one report: the ``page`` files and the ``data`` files.

    Parameters
    ----------
    target : path
        The report folder (created with its parents when missing).
    page : mapping of file name -> bytes or writer
        The page's files (rendered from the results).
    data : mapping of file name -> bytes or writer, optional
        Data files written beside the page (tables, outputs, the policy). None keeps the
        earlier report's data files (a page rebuilt from its results); an empty mapping
        removes them.

    Returns
    -------
    Path
        The report folder.

    Raises
    ------
    exitguard.FileSafetyError
        ``target`` is not a folder, or one of the report's file names there is a link or a
        special file (refused before anything is written).
    OSError
        A write failed; the target is unchanged.
    """
    folder = Path(target)
    _check_folder(folder)
    names = list(page) + list(data or {})
    if len(set(names)) != len(names) or not all(_plain_name(n) for n in names):
        raise ValueError(f"report file names must be distinct plain names; got {names}.")
    earlier = _manifest(folder) if folder.is_dir() else None
    kept = [] if data is not None or earlier is None else list(earlier["data"])
    kept = [n for n in kept if n not in names and _is_regular(folder / n)]
    entries = [e for e in _entries(folder) if e != MANIFEST]
    ours = set() if earlier is None else set(earlier["page"]) | set(earlier["data"])
    replace_whole = (
        not folder.is_symlink()
        and all(e in ours and _is_regular(folder / e) for e in entries)
        and not (folder.exists() and _is_cwd_or_above(folder))
    )
    if folder.exists() and not replace_whole:
        for name in [*names, MANIFEST]:  # refused before anything is written
            check_write_target(folder / name, argument="out")
    parent = folder.parent if replace_whole or not folder.exists() else folder
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FileSafetyError(
            f"out: cannot create the report folder {folder} ({error.strerror or error})."
        ) from error
    fresh = Path(tempfile.mkdtemp(dir=parent, prefix=f".{folder.name}.new-"))
    try:
        for name, writer in {**page, **(data or {})}.items():
            atomic_write(fresh / name, writer, argument="out")
        manifest = {
            "schema": MANIFEST_SCHEMA,
            "page": list(page),
            "data": list(data) if data is not None else kept,
        }
        atomic_write_text(fresh / MANIFEST, json.dumps(manifest, indent=2) + "\n", argument="out")
        if replace_whole:
            _swap(folder, fresh, kept)
        else:
            _merge(folder, fresh, stale=_stale(earlier, names, kept))
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    return folder


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _stale(
    earlier: Mapping[str, Iterable[str]] | None, names: list[str], kept: list[str]
) -> list[str]:
    if earlier is None:
        return []
    listed = [*earlier["page"], *earlier["data"]]
    return [n for n in listed if n not in names and n not in kept and n != MANIFEST]


def _swap(folder: Path, fresh: Path, kept: list[str]) -> None:
    """Replace ``folder`` (absent, or holding only an earlier report) by ``fresh``."""
    for name in kept:  # the earlier report's data files travel to the fresh folder
        os.rename(folder / name, fresh / name)
    os.chmod(fresh, 0o777 & ~_umask())
    if not folder.exists():
        os.rename(fresh, folder)
        return
    aside = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old-"))
    os.rmdir(aside)  # only its unpredictable name is wanted
    os.rename(folder, aside)
    try:
        os.rename(fresh, folder)
    except BaseException:
        os.rename(aside, folder)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _merge(folder: Path, fresh: Path, *, stale: list[str]) -> None:
    """Move the fresh files into ``folder`` (which holds files of others) and remove stale ones."""
    for name in _entries(fresh):  # a loop over the report's few files
        target = check_write_target(folder / name, argument="out")
        os.replace(fresh / name, target)
    os.rmdir(fresh)
    for name in stale:
        if _is_regular(folder / name):  # never a link, a folder or a device
            os.unlink(folder / name)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
