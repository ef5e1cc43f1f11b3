"""Where and how a distributed run runs: the settings the demos and the command line pass.

Imports neither Ray nor torch, so task configurations and the CLI can hold these settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from typing import TypedDict

from exitguard.risk._validation import check_int


class RunOptions(TypedDict, total=False):
    """Where and how :func:`exitguard.distributed.run` runs a job: its keyword arguments,
    which :func:`~exitguard.distributed.collect`, :func:`~exitguard.distributed.diffusion_sweep`
    and :func:`~exitguard.distributed.lm_sweep` pass on as ``**options: Unpack[RunOptions]``
    (see :func:`~exitguard.distributed.run` for their meaning and defaults)."""

    address: str | None
    workers: int | None
    threads: int
    shards: str | os.PathLike[str] | None
    retries: int
    progress: bool
    log: Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class RaySettings:
    """Settings of :func:`exitguard.distributed.run` for the demos and the CLI.

    Attributes
    ----------
    address : str
        ``"local"`` starts a Ray on this machine (when this process is not connected yet),
        ``"auto"`` joins the running cluster (``ray start --head`` ...), ``"host:port"`` or
        ``"ray://host:10001"`` a given one.
    workers : int or None
        Actors (default: the cluster's CPUs divided by ``threads``).
    threads : int
        Torch threads (and Ray CPUs) per actor.
    shards : str or None
        The shard folder (keep it to resume an interrupted run); default a temporary one.
    retries : int
        How often Ray retries an item whose worker died (the worker always restarts).
    """

    address: str = "local"
    workers: int | None = None
    threads: int = 1
    shards: str | None = None
    retries: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.address, str) or not self.address:
            raise ValueError(
                "`address` must be 'local', 'auto', 'host:port' or 'ray://host:port'; got "
                f"{self.address!r}."
            )
        check_int(self.workers, "workers", allow_none=True)
        check_int(self.threads, "threads", minimum=1)
        check_int(self.retries, "retries", minimum=0)

    def run_options(self) -> RunOptions:
        """Keyword arguments of :func:`exitguard.distributed.run` (and the task functions)."""
        return {
            "address": self.address,
            "workers": self.workers,
            "threads": self.threads,
            "shards": self.shards,
            "retries": self.retries,
        }


def add_ray_options(parser: argparse.ArgumentParser) -> None:
    """``--ray [ADDRESS]``, ``--workers N`` and ``--shards DIR`` on a command."""
    parser.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="run the collection or sweep on Ray: no value starts a local Ray, 'auto' joins "
        "the running cluster (ray start --head ...), or give host:port / ray://host:10001 "
        '(needs pip install "exitguard[ray]")',
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="Ray workers (default: one per CPU)"
    )
    parser.add_argument(
        "--shards",
        default=None,
        help="folder of the finished work items (npz); run again with it to resume",
    )


def ray_settings(args: argparse.Namespace, *, threads: int | None = None) -> RaySettings | None:
    """The :class:`RaySettings` of parsed ``--ray``/``--workers``/``--shards``, or None."""
    if args.ray is None:
        if args.workers is not None or args.shards is not None:
            raise ValueError("`--workers` and `--shards` apply to a run with `--ray`.")
        return None
    return RaySettings(
        address=args.ray, workers=args.workers, threads=threads or 1, shards=args.shards
    )
