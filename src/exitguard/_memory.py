"""Memory guards: refuse work that cannot fit before allocating it.

The limit is ``$EXITGUARD_MEMORY_LIMIT`` (bytes, or with a K/M/G/T suffix: ``"8G"``) when set,
else three quarters of the memory the operating system reports as available.
"""

from __future__ import annotations

import os
import re

_VARIABLE = "EXITGUARD_MEMORY_LIMIT"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class MemoryLimitError(ValueError):
    """The requested work would need more memory than the limit."""


def format_bytes(count: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - the loop always returns


def available_memory() -> int:
    """Bytes the operating system reports as available (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, AttributeError):
        return 8 << 30


def memory_limit() -> tuple[int, str]:
    """The limit in bytes, and where it comes from (for messages)."""
    text = os.environ.get(_VARIABLE, "").strip()
    if text:
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?", text, flags=re.IGNORECASE)
        if match is None:
            raise ValueError(
                f"${_VARIABLE} must be a number of bytes with an optional K/M/G/T suffix "
                f"(e.g. 8G); got {text!r}."
            )
        limit = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
        return limit, f"${_VARIABLE}"
    return int(0.75 * available_memory()), f"3/4 of the available memory; set ${_VARIABLE}"


def check_memory(estimate: float, *, what: str) -> None:
    """Refuse ``what`` when its ``estimate`` in bytes exceeds :func:`memory_limit`."""
    limit, source = memory_limit()
    if estimate > limit:
        raise MemoryLimitError(
            f"{what} would need about {format_bytes(estimate)} of memory, above the limit of "
            f"{format_bytes(limit)} ({source} to change it)."
        )
