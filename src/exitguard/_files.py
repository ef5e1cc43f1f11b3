"""Reading and writing files safely: atomic replacement, no symlink following, bounded reads.

Guarantees of every write made through this module:

* **Atomic.** The content goes to a temporary file created with an unpredictable name
  (``tempfile.mkstemp``, ``O_EXCL``) in the target's own folder, is flushed to disk, and only
  then replaces the target by ``os.replace``. A failed write (full disk, a crash, an exception
  in the writer) removes the temporary file and leaves the previous file untouched.
* **No symlink following, no special files.** A target that is a symbolic link, or exists and
  is not a regular file (a folder, a device node, a FIFO, a socket), is refused: exitguard
  never writes through a link it did not create and never replaces a device.
* **Mode.** A new file gets the mode the umask gives new files (as ``open`` would).

Reads refuse anything that is not a regular file (a FIFO would block forever) and anything
larger than the caller's limit, before reading it.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


class FileSafetyError(ValueError):
    """A path that exitguard refuses to read or write (a link, a special file, too large)."""


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def check_write_target(path: str | os.PathLike[str], *, argument: str = "path") -> Path:
    """The target as a Path, after refusing links, special files and missing folders."""
    target = Path(path)
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        info = None
    if info is not None and not stat.S_ISREG(info.st_mode):
        raise FileSafetyError(
            f"{argument}: {target} exists and is {_kind(info.st_mode)}; refusing to replace it "
            "(exitguard only replaces regular files and never writes through a link)."
        )
    parent = target.parent
    if not parent.is_dir():
        raise FileSafetyError(f"{argument}: the folder {parent} does not exist.")
    return target


def _umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(
    path: str | os.PathLike[str],
    writer: Callable[[IO[bytes]], Any] | bytes,
    *,
    argument: str = "path",
) -> Path:
    """Write a file atomically (see the module docstring); ``writer`` gets a binary handle."""

    def fill(name: str) -> None:
        with open(name, "wb") as handle:
            if isinstance(writer, bytes):
                handle.write(writer)
            else:
                writer(handle)

    return atomic_save(path, fill, argument=argument)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, argument: str = "path") -> Path:
    """:func:`atomic_write` of UTF-8 text."""
    return atomic_write(path, text.encode("utf-8"), argument=argument)


def atomic_save(
    path: str | os.PathLike[str],
    save: Callable[[str], Any],
    *,
    argument: str = "path",
) -> Path:
    """Atomic write through a library that takes a file name (safetensors, matplotlib).

    ``save`` receives the name of a fresh temporary file (created with ``O_EXCL`` in the
    target's folder, so no planted link can redirect it) and writes it; the file is flushed
    to disk and then replaces the target. Any failure removes the temporary file and leaves
    the target as it was.
    """
    target = check_write_target(path, argument=argument)
    descriptor, temporary = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"
    )
    os.close(descriptor)
    try:
        save(temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(temporary, _umask_mode())
        os.replace(temporary, target)
    except BaseException as error:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        if isinstance(error, OSError) and not isinstance(error, FileSafetyError):
            raise OSError(
                error.errno,
                f"{argument}: could not write {target} ({error.strerror or error}); "
                "any previous file is unchanged",
            ) from error
        raise
    return target


def read_regular_file(
    path: str | os.PathLike[str], *, max_bytes: int, argument: str = "path"
) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``, refusing FIFOs and devices."""
    source = Path(path)
    try:
        descriptor = os.open(source, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{argument}: no such file: {source}") from error
    info = os.fstat(descriptor)
    if not stat.S_ISREG(info.st_mode):
        os.close(descriptor)
        raise FileSafetyError(f"{argument}: {source} is {_kind(info.st_mode)}, not a regular file.")
    with os.fdopen(descriptor, "rb") as handle:
        if info.st_size > max_bytes:
            raise FileSafetyError(
                f"{argument}: {source} holds {info.st_size} bytes; the limit is {max_bytes}."
            )
        data = handle.read(min(max_bytes, info.st_size) + 1)  # never allocate the whole limit
    if len(data) > max_bytes:
        raise FileSafetyError(
            f"{argument}: {source} is larger than the limit of {max_bytes} bytes."
        )
    return data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (iterative, so no recursion limit applies)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in item)
    return deepest


def parse_json(text: str | bytes, *, max_depth: int, source: str = "JSON") -> Any:
    """Strict JSON: no duplicate keys, no NaN/Infinity, nesting at most ``max_depth``."""
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except RecursionError as error:
        raise ValueError(f"{source} is nested too deeply (limit {max_depth}).") from error
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{source} is not valid JSON: {error}.") from error
    if _depth(value) > max_depth:
        raise ValueError(f"{source} is nested too deeply (limit {max_depth}).")
    return value


def load_json(
    path: str | os.PathLike[str], *, max_bytes: int, max_depth: int, argument: str = "path"
) -> Any:
    """Read a strict JSON file (see :func:`parse_json`) of at most ``max_bytes``."""
    data = read_regular_file(path, max_bytes=max_bytes, argument=argument)
    return parse_json(data, max_depth=max_depth, source=f"{argument}: {path}")


_NPZ_KINDS = frozenset("biuf")  # bool, integers, floats: nothing else is data here


def read_npz(
    path: str | os.PathLike[str],
    *,
    argument: str = "FILE",
) -> dict[str, Any]:
    """Arrays of an ``.npz`` file, each checked before it is read.

    Every member must be a ``.npy`` array of booleans, integers or floats, or one string of
    at most 100,000 characters (a name, fingerprint or settings); the header of each is read
    first and the total size checked against the memory limit (:mod:`exitguard._memory`)
    before any data is loaded, so a header that claims terabytes is refused up front.
    Pickled objects are never loaded; a truncated or damaged archive gives one clear error.
    """
    import zipfile

    import numpy as np

    from exitguard._memory import MemoryLimitError, check_memory

    source = Path(path)
    try:
        info = os.stat(source)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{argument}: no such file: {source}") from error
    if not stat.S_ISREG(info.st_mode):
        raise FileSafetyError(f"{argument}: {source} is {_kind(info.st_mode)}, not a regular file.")
    with source.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"PK\x03\x04":
        raise FileSafetyError(
            f"{argument}: {source} is not an .npz file (numpy.savez writes one); it starts with "
            f"{magic!r}."
        )
    arrays: dict[str, Any] = {}
    try:
        with zipfile.ZipFile(source) as archive:
            members = archive.infolist()
            if not members:
                raise FileSafetyError(f"{argument}: {source} holds no arrays.")
            total = 0
            for member in members:
                if not member.filename.endswith(".npy"):
                    raise FileSafetyError(
                        f"{argument}: {source} holds {member.filename!r}, which is not a .npy "
                        "array; an .npz file must hold arrays only."
                    )
                name = member.filename[: -len(".npy")]
                with archive.open(member) as stream:
                    version = np.lib.format.read_magic(stream)
                    reader = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = reader(stream)
                # One short string (a name or a fingerprint) is metadata, never data.
                text = dtype.kind == "U" and shape == () and dtype.itemsize <= 4 * 100_000
                if dtype.kind not in _NPZ_KINDS and not text:
                    raise FileSafetyError(
                        f"{argument}: `{name}` in {source} has dtype {dtype}; only boolean, "
                        "integer and float arrays are read."
                    )
                total += int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
            check_memory(float(total), what=f"{argument}: reading {source}")
            for member in members:
                with archive.open(member) as stream:
                    name = member.filename[: -len(".npy")]
                    arrays[name] = np.lib.format.read_array(stream, allow_pickle=False)
    except (FileSafetyError, MemoryLimitError):
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as error:
        raise FileSafetyError(
            f"{argument}: {source} is not a readable .npz file ({' '.join(str(error).split())})."
        ) from error
    return arrays
