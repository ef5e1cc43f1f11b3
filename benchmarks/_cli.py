"""The command-line options the benchmarks share, and where they write their results."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def certification_options(
    parser: argparse.ArgumentParser,
    *,
    n_cal: int | Sequence[int],
    target_risk: float | Sequence[float],
    repeats: int = 5,
    threads: int = 2,
) -> None:
    """Add ``--n-cal``, ``--target-risk`` (lists where the default is a list), ``--delta``,
    ``--trials`` (random splits), ``--repeats`` (timing), ``--threads``, ``--seed``, ``--out``."""
    for flag, default, kind in (("--n-cal", n_cal, int), ("--target-risk", target_risk, float)):
        if isinstance(default, Sequence):
            parser.add_argument(flag, type=kind, nargs="+", default=list(default))
        else:
            parser.add_argument(flag, type=kind, default=default)
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--trials", type=int, default=100, help="random calibration/test splits")
    parser.add_argument("--repeats", type=int, default=repeats, help="timing repeats")
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/)")


def results_path(out: str | None, name: str) -> Path:
    """``out``, or ``benchmarks/results/<name>.json``; its folder is created."""
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
