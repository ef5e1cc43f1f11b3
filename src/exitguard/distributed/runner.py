"""Run the work items of a job on a pool of Ray actors, one shard per finished item.

The driver (this process) splits the job into work items, starts ``workers`` actors (each
builds its model once, in its constructor) and keeps one item in flight per actor: an item
goes to the first idle actor, so fast and slow workers balance themselves. Every finished
item is written by the driver as a shard into the shard folder (:mod:`.shards`); nothing is
kept only in memory, so a run that stops for any reason keeps what it finished.

Faults:

- a worker process that dies (killed, out of memory, a crash in native code) is restarted by
  Ray, which reloads the model, and the item it was running is retried — Ray's own retries
  (``max_task_retries`` = ``retries`` per item; the actor itself always restarts);
- an item that still fails (it kills its worker every time, or raises) is reported by id and
  the other items go on. The run then raises
  :class:`IncompleteRunError` naming the failed items; the shards of the others stay on
  disk, and a rerun with the same folder computes only what is missing (resume).

Why Ray Core actors and not Ray Data ``map_batches``: bitwise equality with the
single-process code needs the same batches (blocks aligned with its batches), sweeps have
cells that depend on another cell's output (the full model's images), and each item's
outcome must be attributed and written as it finishes; an actor pool gives that directly.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from exitguard.distributed.options import RunOptions
from exitguard.distributed.shards import Shard, ShardStore, check_item_id
from exitguard.risk._validation import check_int

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typed **options (PEP 692; typing has it from 3.11)


def import_ray() -> Any:
    """The ``ray`` module, or an ImportError saying how to install it."""
    try:
        import ray
    except ImportError as error:
        raise ImportError(
            'distributed runs need Ray: pip install "exitguard[ray]" (or pip install ray)'
        ) from error
    return ray


def connect(address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Connect to Ray unless this process already is; True when this call started it.

    ``address``: None or ``"local"`` starts a local Ray on this machine (``num_cpus`` CPUs,
    default all); ``"auto"`` joins the cluster this machine belongs to (``ray start --head``
    / ``ray start --address ...``); ``"host:port"`` or ``"ray://host:10001"`` a given one.
    """
    ray = import_ray()
    if ray.is_initialized():
        return False
    if address is not None and (not isinstance(address, str) or not address):
        raise ValueError(
            "`address` must be None or 'local' (a local Ray), 'auto' (the running cluster), "
            f"'host:port' or 'ray://host:port'; got {address!r}."
        )
    if address in (None, "local"):
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    return True


# ------------------------------------------------------------------------- work items


@dataclasses.dataclass(frozen=True, repr=False)
class WorkItem:
    """One unit of work: some samples under some configurations.

    Attributes
    ----------
    id : str
        Unique in the run; names the shard file.
    sample_ids : int64 array of shape (b,)
    rows : int64 array of shape (k,) or None
        The configurations (grid rows); None for per-sample outputs.
    after : str or None
        An item whose shard this one reads (e.g. the full model's images of the same samples).
    """

    id: str
    sample_ids: NDArray[np.int64]
    rows: NDArray[np.int64] | None = None
    after: str | None = None

    def __post_init__(self) -> None:
        check_item_id(self.id)
        object.__setattr__(self, "sample_ids", np.asarray(self.sample_ids, dtype=np.int64))
        if self.rows is not None:
            object.__setattr__(self, "rows", np.asarray(self.rows, dtype=np.int64))

    def __repr__(self) -> str:
        return f"WorkItem({self.describe()})"

    def describe(self) -> str:
        """'g01-b00003 (samples 96-127, rows 5-9)'."""
        ids = self.sample_ids
        samples = f"samples {ids.min()}-{ids.max()}" if ids.size else "no samples"
        rows = "" if self.rows is None else f", rows {self.rows.min()}-{self.rows.max()}"
        return f"{self.id} ({samples}{rows})"


class Worker(abc.ABC):
    """What every actor holds: code and small settings (models as payloads without weights).

    Ray pickles this object into each actor; it must not hold a model, weights or data.
    :meth:`setup` runs once per actor (again after a restart) with the weights of
    :meth:`Job.weights` fetched from the object store; :meth:`compute` once per item.
    """

    @abc.abstractmethod
    def setup(self, weights: Mapping[str, bytes]) -> None:
        """Build the models (once per actor) from their safetensors bytes."""

    @abc.abstractmethod
    def compute(
        self, item: WorkItem, inputs: Mapping[str, Any]
    ) -> tuple[dict[str, NDArray[Any]], dict[str, Any]]:
        """The item's arrays (leading axes (b, ...) or (k, b, ...)) and JSON-ready info."""


class Job(abc.ABC):
    """A distributed computation: its description, work items, inputs, worker and merge."""

    @abc.abstractmethod
    def description(self) -> dict[str, Any]:
        """JSON-ready; identifies the run (weights, data, seed, grid, blocks)."""

    @abc.abstractmethod
    def items(self) -> list[WorkItem]:
        """All work items of the run."""

    def inputs(self, item: WorkItem, store: ShardStore) -> dict[str, Any]:
        """What the driver sends with ``item`` (data of its samples, a dependency's output)."""
        return {}

    @abc.abstractmethod
    def worker(self) -> Worker:
        """The worker the actors run."""

    def weights(self) -> dict[str, bytes]:
        """Safetensors bytes by name, put into the object store once and given to
        :meth:`Worker.setup` on every actor."""
        return {}

    @abc.abstractmethod
    def merge(self, store: ShardStore, *, seconds: float) -> Any:
        """The result from a complete shard folder."""


class _Actor:
    """The Ray actor around a :class:`Worker`.

    The weights come as object references nested in a dict with every call (only the ids
    travel; Ray does not resolve nested references), so a restarted actor, whose constructor
    Ray runs again, sets itself up on its next call.
    """

    def __init__(self, worker: Worker, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.worker = worker
        self.ready = False

    def setup(self, weights: Mapping[str, Any]) -> int:
        if not self.ready:
            import ray

            self.worker.setup({name: ray.get(ref) for name, ref in weights.items()})
            self.ready = True
        return os.getpid()

    def compute(
        self, item: WorkItem, inputs: Mapping[str, Any], weights: Mapping[str, Any]
    ) -> tuple[dict[str, NDArray[Any]], dict[str, Any]]:
        self.setup(weights)
        start = time.perf_counter()
        arrays, info = self.worker.compute(item, inputs)
        info = {
            **info,
            "seconds": time.perf_counter() - start,
            "worker": f"{socket.gethostname()}:{os.getpid()}",
        }
        return arrays, info


# ------------------------------------------------------------------------------ report


@dataclasses.dataclass(frozen=True)
class RunReport:
    """What a run did.

    Attributes
    ----------
    folder : str
        The shard folder.
    items : int
        Work items of the run.
    computed, resumed : tuple of str
        Items computed by this run, and items whose shard was already there.
    failed : dict of str to str
        Items that failed after Ray's retries, with the reason.
    workers, threads : int
        Actors started and torch threads per actor.
    seconds : float
        Wall time from connecting to Ray to the last shard written (0 when nothing was left).
    startup_seconds : float
        Of which: starting the actors and loading their models.
    compute_seconds : dict of str to float
        Per computed item, the time spent in the worker's ``compute``.
    """

    folder: str
    items: int
    computed: tuple[str, ...]
    resumed: tuple[str, ...]
    failed: dict[str, str]
    workers: int
    threads: int
    seconds: float
    startup_seconds: float
    compute_seconds: dict[str, float]

    @property
    def complete(self) -> bool:
        return not self.failed

    @property
    def overhead_per_item(self) -> float:
        """Seconds per computed item that the workers did not spend computing: dispatch,
        transfers, shard writing and idle time, from ``workers * (seconds - startup) -
        sum(compute)``; NaN when nothing was computed."""
        if not self.computed:
            return float("nan")
        busy = sum(self.compute_seconds.values())
        spent = self.workers * (self.seconds - self.startup_seconds)
        return (spent - busy) / len(self.computed)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "overhead_per_item": self.overhead_per_item}

    def __repr__(self) -> str:
        return (
            f"RunReport(items={self.items}, computed={len(self.computed)}, resumed="
            f"{len(self.resumed)}, failed={sorted(self.failed)}, workers={self.workers}, "
            f"seconds={self.seconds:.2f})"
        )


class IncompleteRunError(RuntimeError):
    """Some work items failed after Ray's retries; the others' shards are kept.

    Attributes
    ----------
    report : RunReport
    """

    def __init__(self, report: RunReport, items: Sequence[WorkItem]) -> None:
        self.report = report
        by_id = {item.id: item for item in items}
        listed = "; ".join(
            f"{by_id[item].describe()}: {reason}"
            for item, reason in sorted(report.failed.items())[:5]
        )
        more = f" (and {len(report.failed) - 5} more)" if len(report.failed) > 5 else ""
        done = len(report.computed) + len(report.resumed)
        super().__init__(
            f"{len(report.failed)} of {report.items} work items failed: {listed}{more}. The "
            f"{done} finished items are kept in {report.folder}; run again with that shard "
            "folder to compute only the missing ones."
        )


# -------------------------------------------------------------------------------- run


def _progress(total: int) -> Any:
    """A tqdm bar over ``total`` work items, or None without tqdm."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="work items", unit="item", leave=False)


def _reason(error: BaseException) -> str:
    text = str(getattr(error, "cause", None) or error).strip().splitlines()
    first = text[0] if text else type(error).__name__
    return f"{type(error).__name__}: {first}"[:300]


def run(
    job: Job,
    *,
    address: str | None = None,
    workers: int | None = None,
    threads: int = 1,
    shards: str | os.PathLike[str] | None = None,
    retries: int = 2,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> RunReport:
    """Compute every missing work item of ``job`` on Ray actors; write one shard per item.

    Parameters
    ----------
    job : Job
    address : str, optional
        Where Ray runs (see :func:`connect`): None or ``"local"`` starts one on this machine
        when this process is not connected yet, ``"auto"`` joins the running cluster.
    workers : int, optional
        Actors to start (default: the cluster's CPUs divided by ``threads``), never more than
        that nor than the items left.
    threads : int
        Torch CPU threads (and Ray CPUs) per actor.
    shards : path, optional
        The shard folder. A folder of the same run resumes it; a folder of another run is
        refused. Default: a new temporary folder.
    retries : int
        How often Ray retries an item whose worker died (the worker itself always restarts).
    progress : bool
        A progress bar over the items.
    log : callable
        Receives one line per notable event (resumed items, failures, replaced workers).

    Returns
    -------
    RunReport

    Raises
    ------
    IncompleteRunError
        When items still fail after the retries (their ids, the reasons and the folder).
    """
    for name, value, low in (("threads", threads, 1), ("retries", retries, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"`{name}` must be an integer >= {low}; got {value!r}.")
    check_int(workers, "workers", allow_none=True)
    items = job.items()
    by_id = {item.id: item for item in items}
    if len(by_id) != len(items):
        raise ValueError("the job's work item ids must be unique.")
    folder = Path(shards) if shards is not None else Path(tempfile.mkdtemp(prefix="exitguard-"))
    store = ShardStore(folder, description=job.description(), items=list(by_id))
    finished, bad = store.finished(list(by_id))
    for name, why in sorted(bad.items()):  # a loop over unusable shards, to say so
        log(f"computing {name} again: {why}")
    resumed = tuple(sorted(finished))
    if resumed:
        log(f"resuming from {folder}: {len(resumed)} of {len(items)} work items already done")
    pending = collections.deque(item for item in items if item.id not in finished)
    if not pending:
        return RunReport(
            folder=str(folder),
            items=len(items),
            resumed=resumed,
            threads=threads,
            computed=(),
            failed={},
            workers=0,
            seconds=0.0,
            startup_seconds=0.0,
            compute_seconds={},
        )
    ray = import_ray()
    start = time.perf_counter()
    connect(address)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    most = max(1, cpus // threads)
    if workers is None:
        workers = most
    elif workers > most:  # more would wait for CPUs that never come
        log(
            f"{workers} workers of {threads} thread(s) asked for, the cluster has {cpus} CPUs: "
            f"starting {most}"
        )
        workers = most
    n_actors = min(workers, len(pending))
    # A dead actor always restarts; each item is retried `retries` times (Ray counts per task).
    actor_class = ray.remote(num_cpus=threads, max_restarts=-1, max_task_retries=retries)(_Actor)
    worker = job.worker()
    weights = {name: ray.put(value) for name, value in job.weights().items()}
    actors = [actor_class.remote(worker, threads) for _ in range(n_actors)]
    try:
        ray.get([actor.setup.remote(weights) for actor in actors])
    except ray.exceptions.RayError as error:
        for actor in actors:  # a loop over the few actors
            ray.kill(actor)
        raise RuntimeError(f"the workers could not start: {_reason(error)}") from error
    startup = time.perf_counter() - start

    computed: list[str] = []
    failed: dict[str, str] = {}
    compute_seconds: dict[str, float] = {}
    running: dict[Any, tuple[Any, WorkItem]] = {}
    idle = list(actors)
    replacements = 0
    bar = _progress(len(pending)) if progress else None

    def next_ready() -> WorkItem | None:
        for _ in range(len(pending)):  # a loop over the queue: skip items still blocked
            item = pending.popleft()
            if item.after is None or item.after in finished:
                return item
            if item.after in failed:
                failed[item.id] = f"it needs item {item.after}, which failed"
                continue
            pending.append(item)
        return None

    try:
        while pending or running:
            while idle and pending:
                item = next_ready()
                if item is None:
                    break
                actor = idle.pop()
                inputs = job.inputs(item, store)
                running[actor.compute.remote(item, inputs, weights)] = (actor, item)
            if not running:
                break  # the rest waits on failed items (already reported)
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                actor, item = running.pop(ref)
                try:
                    arrays, info = ray.get(ref)
                except ray.exceptions.RayActorError as error:
                    failed[item.id] = f"its worker died {retries + 1} times ({_reason(error)})"
                    log(f"work item {item.describe()} failed: {failed[item.id]}")
                    if not isinstance(error, ray.exceptions.ActorDiedError):
                        idle.append(actor)  # Ray restarts it
                    elif replacements < n_actors + len(items):  # gone for good: replace it
                        ray.kill(actor)
                        replacements += 1
                        fresh = actor_class.remote(worker, threads)
                        actors.append(fresh)
                        idle.append(fresh)
                    continue
                except ray.exceptions.RayError as error:
                    failed[item.id] = _reason(error)
                    log(f"work item {item.describe()} failed: {failed[item.id]}")
                    idle.append(actor)
                    continue
                store.write(Shard(item.id, item.sample_ids, arrays, rows=item.rows, meta=info))
                finished.add(item.id)
                computed.append(item.id)
                compute_seconds[item.id] = float(info["seconds"])
                idle.append(actor)
                if bar is not None:
                    bar.update()
    finally:
        if bar is not None:
            bar.close()
        for actor in actors:  # a loop over the few actors: free their CPUs
            ray.kill(actor)
    for item in pending:  # blocked behind a failed item
        failed.setdefault(item.id, f"it needs item {item.after}, which failed")
    result = RunReport(
        folder=str(folder),
        items=len(items),
        resumed=resumed,
        threads=threads,
        computed=tuple(computed),
        failed=failed,
        workers=n_actors,
        seconds=time.perf_counter() - start,
        startup_seconds=startup,
        compute_seconds=compute_seconds,
    )
    if failed:
        raise IncompleteRunError(result, items)
    return result


def run_and_merge(job: Job, **options: Unpack[RunOptions]) -> Any:
    """:func:`run`, then the job's merge; a temporary shard folder is removed after a
    complete run (and kept, named in the error, after an incomplete one)."""
    report = run(job, **options)
    result = job.merge(ShardStore(report.folder), seconds=report.seconds)
    if options.get("shards") is None:
        shutil.rmtree(report.folder, ignore_errors=True)
    return result
