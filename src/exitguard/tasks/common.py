"""Plumbing shared by the task demos: the model cache, timing, progress and result headers.

Every task (classification, segmentation, diffusion) trains a small model here once and
caches it; every demo checks its calibrated policies over repeated splits and writes a results
dict that :func:`exitguard.report.write_report` turns into a report folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

import exitguard
from exitguard._files import (
    atomic_save,
    atomic_write_text,
    check_write_target,
    load_json,
    read_regular_file,
)
from exitguard.evaluation import Evaluation, evaluate, split_indices
from exitguard.nn import EarlyExitNetwork, FlopsTable, TrainConfig, train_exits
from exitguard.nn.io import assign_tensors, stored_tensors
from exitguard.policy import ExitPolicy
from exitguard.report.results import (
    DatasetInfo,
    DemoResults,
    DriftResults,
    Machine,
    RiskResult,
    Settings,
    Speed,
    TimedPolicy,
)

PROCEDURES = ("naive", "crc", "ucb-wsr", "ltt")
"""The procedures every demo compares."""
TARGET_RISKS = (*(round(0.01 * k, 2) for k in range(1, 21)), 0.25, 0.3)
"""The target risks of the classification, segmentation and text demos: 0.01 to 0.2, 0.25, 0.3."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoOptions:
    """What every demo takes (what ``exitguard demo`` passes to each task).

    ``out`` is the report folder, ``n_cal`` the calibration size of each of ``trials``
    random calibration/test splits, ``delta`` the level of the high-probability procedures.
    """

    out: str
    seed: int = 0
    n_cal: int = 100
    trials: int = 100
    delta: float = 0.1
    quick: bool = False
    progress: bool = True
    cache_dir: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageOptions(DemoOptions):
    """The options of the demos on images: ``dataset`` (``digits``, ``mnist-5k``,
    ``fashion-mnist``) and, for Fashion-MNIST, the folder of its IDX files."""

    dataset: str = "digits"
    dataset_path: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class PolicyOptions(DemoOptions):
    """The options of the demos that compare procedures over a grid of target risks and run
    one calibrated policy for real (``policy_procedure`` at ``policy_target_risk``)."""

    procedures: tuple[str, ...] = PROCEDURES
    target_risks: tuple[float, ...] = TARGET_RISKS
    policy_procedure: str = "ucb-wsr"
    policy_target_risk: float = 0.05
    timing_repeats: int | None = None


def default_cache_dir() -> Path:
    """``$EXITGUARD_CACHE``, else ``$XDG_CACHE_HOME/exitguard``, else ``~/.cache/exitguard``."""
    if "EXITGUARD_CACHE" in os.environ:
        return Path(os.environ["EXITGUARD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "exitguard"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


M = TypeVar("M", bound=nn.Module)


@dataclasses.dataclass(frozen=True)
class CachedModel(Generic[M]):
    """A trained module, the metadata of its cache entry, and whether it came from the cache."""

    module: M
    metadata: dict[str, Any]
    from_cache: bool


class ServesTrained:
    """For the prepared state of a vision demo: the trained network, the copy that is served
    (BatchNorm folded, :func:`exitguard.nn.optimize_for_inference`) and its FLOPs table."""

    trained: CachedModel[EarlyExitNetwork]
    served: EarlyExitNetwork | None
    flops: FlopsTable

    @property
    def network(self) -> EarlyExitNetwork:
        """The network that is calibrated and served: the trained one with BatchNorm folded;
        the held-out outputs are its own."""
        return self.trained.module if self.served is None else self.served

    @property
    def exit_flops(self) -> np.ndarray:
        """(L,) FLOPs of a sample that leaves at each exit (heads on the way included)."""
        return self.flops.to_exit.astype(np.float64)


def model_description(
    cache_format: str,
    *,
    dataset: str,
    data_fingerprint: str,
    model: Any,
    train: Any,
    **extra: Any,
) -> dict[str, Any]:
    """What determines a trained model's weights, as a cache entry records it.

    ``model`` and ``train`` are the architecture and training dataclasses; ``extra`` adds
    task-specific entries (e.g. the architecture fingerprint). The torch version is included.
    """
    return {
        "format": cache_format,
        "dataset": dataset,
        "data_fingerprint": data_fingerprint,
        "model": dataclasses.asdict(model),
        "train": dataclasses.asdict(train),
        **extra,
        "torch": torch.__version__.split("+")[0],
    }


class Fingerprinted(Protocol):
    """Data that names itself and fingerprints its content (the datasets of exitguard.data)."""

    @property
    def name(self) -> str: ...

    @property
    def fingerprint(self) -> str: ...


@dataclasses.dataclass(frozen=True)
class DataKey:
    """The name and fingerprint of training data that is not a dataset object."""

    name: str
    fingerprint: str


@dataclasses.dataclass(frozen=True)
class ModelCache:
    """One kind of cached model: its file-name prefix (e.g. ``"segmenter"``) and format."""

    kind: str
    cache_format: str

    def entry(self, data: Fingerprinted, *, model: Any, train: Any, **extra: Any) -> CacheEntry:
        """The cache entry of a model of this kind trained on ``data``: see
        :func:`model_description` for ``model``, ``train`` (whose ``seed`` seeds the initial
        weights) and ``extra``."""
        description = model_description(
            self.cache_format,
            dataset=data.name,
            data_fingerprint=data.fingerprint,
            model=model,
            train=train,
            **extra,
        )
        return CacheEntry(f"{self.kind}-{data.name}", description, seed=int(train.seed))


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    """A cache entry's file-name prefix, its description and the seed of its initial weights."""

    name: str
    description: dict[str, Any]
    seed: int

    def load_or_train(
        self,
        build: Callable[[], M],
        fit: Callable[[M], Mapping[str, Any]],
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        log: Callable[[str], None] = print,
    ) -> CachedModel[M]:
        """:func:`cached_model` of this entry: load it, or ``build()`` and ``fit`` it."""
        return cached_model(
            self.name,
            self.description,
            build=build,
            train=fit,
            seed=self.seed,
            cache_dir=cache_dir,
            log=log,
        )


class JointTraining(Protocol):
    """The training settings :func:`train_jointly` reads."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    distill: float
    seed: int
    lr_schedule: Literal["constant", "cosine"]


def train_jointly(
    network: EarlyExitNetwork,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    settings: JointTraining,
    progress: bool,
) -> dict[str, Any]:
    """Train stages and heads together (self-distillation from the last exit); the history."""
    history = train_exits(
        network,
        torch.from_numpy(images),
        labels=torch.from_numpy(labels),
        config=TrainConfig(
            mode="joint",
            epochs=settings.epochs,
            batch_size=settings.batch_size,
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            lr_schedule=settings.lr_schedule,
            distill=settings.distill,
            seed=settings.seed,
        ),
        progress=progress,
    )
    return {"history": history.to_dict()}


def cached_model(
    name: str,
    description: Mapping[str, Any],
    *,
    build: Callable[[], M],
    train: Callable[[M], Mapping[str, Any]],
    seed: int,
    cache_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] = print,
) -> CachedModel[M]:
    """Load a trained model from the cache, or train it and cache it.

    The entry ``<name>-<key>.safetensors`` (weights) with ``<name>-<key>.json`` (description,
    the weights' sha256, training metadata) is keyed by a hash of ``description``, which must
    hold everything that determines the weights (data fingerprint, architecture, settings,
    torch version). An entry whose JSON is unreadable or not an object, whose description or
    hash does not match, or whose weights do not load into ``build()`` is trained again;
    nothing is ever unpickled.

    Concurrency and failures: the entry is read, trained and written under an exclusive
    lock (``fcntl.flock`` on ``.<name>-<key>.lock`` in the folder), so a second process
    asking for the same entry waits and then loads it instead of training it again; the
    weights are read once and checked against the JSON's sha256 before use, so a reader
    never accepts a mismatched pair. The JSON is removed first and written last (both files
    atomically), so an interrupted write leaves no pair that passes the checks. A folder
    that cannot be written (read-only, not a folder) is detected before training: the model
    is trained and returned without being cached, with a message saying so.

    Parameters
    ----------
    name : str
        File-name prefix, e.g. ``"segmenter-scenes-digits"``.
    description : mapping
        JSON-serialisable; compared with the cached entry's.
    build : callable
        Returns a fresh, untrained module of the architecture.
    train : callable
        Trains the module in place and returns JSON-serialisable metadata (e.g. the history).
    seed : int
        ``torch.manual_seed`` before ``build()`` when training, so the initial weights are
        reproducible.
    cache_dir : path, optional
        Folder of the entries (default ``default_cache_dir() / "models"``).
    log : callable
        Receives one-line messages (an unusable entry, waiting for another process, a
        folder that cannot be written).
    """
    canonical = json.loads(json.dumps(dict(description)))  # as it reads back from the cache
    key = hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "models"
    weights_path = folder / f"{name}-{key}.safetensors"
    meta_path = weights_path.with_suffix(".json")
    with _entry_lock(folder / f".{name}-{key}.lock", log=log) as locked:
        cached = _read_entry(weights_path, meta_path, canonical, build, log=log)
        if cached is not None:
            return cached
        problem = _unwritable(folder) if locked else "no lock file can be created there"
        if problem is not None:
            log(
                f"the model cache folder {folder} cannot be written ({problem}); training "
                "without caching (set EXITGUARD_CACHE to a writable folder to keep the model)"
            )
        torch.manual_seed(seed)  # the same initial weights for the same seed
        module = build()
        start = time.perf_counter()
        extra = dict(train(module))
        seconds = time.perf_counter() - start
        module.eval()
        metadata = {
            "description": canonical,
            "train_seconds": seconds,
            **extra,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        if problem is None:
            try:
                metadata = _write_entry(module, weights_path, meta_path, metadata)
            except (OSError, ValueError) as error:
                log(f"could not cache the model at {weights_path} ({error}); using it uncached")
        return CachedModel(module, metadata, from_cache=False)


_MAX_ENTRY_JSON = 64 << 20


@contextlib.contextmanager
def _entry_lock(path: Path, *, log: Callable[[str], None]) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path``; yields False when no lock file can be opened."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError:
        try:  # a lock file made by another user: locking it needs only read access
            descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            yield False  # a read-only or missing folder: nothing can be written there anyway
            return
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process that is writing the cache entry {path.name[1:-5]}")
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(descriptor)  # releases the lock


def _unwritable(folder: Path) -> str | None:
    """Why no file can be created in ``folder``, or None when one can (tried for real)."""
    try:
        descriptor, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe.")
    except OSError as error:
        return error.strerror or str(error)
    os.close(descriptor)
    os.unlink(probe)
    return None


def _read_entry(
    weights_path: Path,
    meta_path: Path,
    canonical: Any,
    build: Callable[[], M],
    *,
    log: Callable[[str], None],
) -> CachedModel[M] | None:
    """The cached module when the pair is present and consistent, else None (and why)."""
    import safetensors
    import safetensors.torch

    if not (meta_path.exists() or weights_path.exists()):
        return None
    try:
        metadata = load_json(
            meta_path, max_bytes=_MAX_ENTRY_JSON, max_depth=64, argument="cache entry"
        )
        if not isinstance(metadata, dict):
            raise ValueError(f"its JSON holds {type(metadata).__name__}, not an object")
        if metadata.get("description") != canonical:
            raise ValueError("the cache entry describes another model")
        size = os.stat(weights_path).st_size
        data = read_regular_file(weights_path, max_bytes=max(size, 8), argument="cache entry")
        if metadata.get("sha256") != hashlib.sha256(data).hexdigest():
            raise ValueError("the weights do not match their recorded hash")
        tensors = safetensors.torch.load(data)
        module = build()
        assign_tensors(module, tensors, strict=True, source=weights_path)
        module.eval()
        return CachedModel(module, metadata, from_cache=True)
    except (ValueError, OSError, RuntimeError, safetensors.SafetensorError) as error:
        log(f"cached model at {weights_path} is unusable ({error}); training again")
        return None


def _write_entry(
    module: nn.Module, weights_path: Path, meta_path: Path, metadata: dict[str, Any]
) -> dict[str, Any]:
    """Write the pair: JSON removed first, weights, then the JSON with their sha256."""
    from safetensors.torch import save_file

    tensors = stored_tensors(module)
    if meta_path.is_symlink() or meta_path.exists():
        check_write_target(meta_path, argument="cache entry")  # no link, no special file
        meta_path.unlink()
    atomic_save(
        weights_path,
        lambda name: save_file(tensors, name, metadata={"format": "pt"}),
        argument="cache entry",
    )
    metadata = {**metadata, "sha256": sha256_file(weights_path)}
    atomic_write_text(meta_path, json.dumps(metadata, indent=2) + "\n", argument="cache entry")
    return metadata


def median_seconds(
    fn: Callable[[], Any], *, repeats: int, tick: Callable[[], Any] | None = None
) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after one warm-up call.

    ``tick`` is called after every call (the warm-up included), e.g. a progress bar's update.
    """
    fn()
    if tick is not None:
        tick()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if tick is not None:
            tick()
    return statistics.median(times)


@contextlib.contextmanager
def timing_bar(
    *, runs: int, repeats: int, enabled: bool, desc: str
) -> Iterator[Callable[[], Any] | None]:
    """A progress bar over ``runs`` timed runs of ``repeats + 1`` calls each (warm-up
    included); yields its ``update`` for :func:`median_seconds`, or None when disabled."""
    bar = _progress(total=runs * (repeats + 1), enabled=enabled, desc=desc, unit="call")
    if bar is None:
        yield None
        return
    with bar:
        yield bar.update


def time_inference(
    network: EarlyExitNetwork,
    images: Tensor,
    threshold: float,
    *,
    batch_size: int,
    repeats: int,
    progress: bool = False,
    profile: Any = None,
) -> dict[str, float]:
    """Milliseconds per image of early-exit and full-model inference, timed interleaved
    (:func:`exitguard.nn.measure_speedup`), with the profile's prediction when given."""
    from exitguard.nn.latency import measure_speedup

    desc = f"timing {len(images)} images at batch {batch_size}"
    with timing_bar(runs=2, repeats=repeats, enabled=progress, desc=desc) as tick:
        measured = measure_speedup(
            network,
            images,
            threshold,
            batch_size=batch_size,
            repeats=repeats,
            profile=profile,
            tick=tick,
        )
    timing = {
        "batch_size": batch_size,
        "full_ms_per_image": measured.full_ms,
        "early_exit_ms_per_image": measured.early_ms,
        "measured_speedup": measured.measured_speedup,
    }
    if measured.predicted_speedup is not None:
        timing["predicted_speedup"] = measured.predicted_speedup
    return timing


def _progress(*, enabled: bool, **options: Any) -> Any:
    """A tqdm bar with ``options`` when enabled and tqdm is installed, else None."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(leave=False, **options)


def progress_bar(
    iterable: Iterable[Any], *, enabled: bool, desc: str, total: int | None = None
) -> Iterable[Any]:
    """``iterable`` wrapped in a tqdm bar (count, total and time left when the length is
    known) when enabled and tqdm is installed."""
    bar = _progress(iterable=iterable, enabled=enabled, desc=desc, total=total)
    return iterable if bar is None else bar


def machine_info() -> dict[str, Any]:
    """Python and torch versions, torch's thread count and the platform, for result files."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": f"{platform.system()} {platform.machine()}",
    }


def results_header() -> dict[str, Any]:
    """The fields every demo's results start with: the machine, the time, the version."""
    return {
        "machine": Machine(**machine_info()),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "exitguard_version": exitguard.__version__,
    }


def timed_policy(
    policy: ExitPolicy,
    exits: np.ndarray,
    *,
    n_exits: int,
    flops_saving: float,
    n_cal: int,
    unit: str,
    speeds: Sequence[Speed],
    measures: Sequence[tuple[str, Any]] = (),
    quality: str = "",
    baseline: str = "the full model",
    counted: str = "",
) -> TimedPolicy:
    """The record of one calibrated policy run for real: its exits (0-based) and timings.

    ``exits`` holds the exit each timed sample took, (n,) or (n, steps) (every entry counts;
    ``counted`` names what the entries are when not samples), and ``flops_saving`` is
    ``1 - FLOPs / full-model FLOPs`` on the same samples.
    """
    taken = np.asarray(exits, dtype=np.int64).ravel()
    return TimedPolicy(
        procedure=str(policy.procedure),
        risk=str(policy.risk),
        target_risk=float(policy.target_risk),
        threshold=None
        if policy.is_full_model or policy.threshold is None
        else float(policy.threshold),
        certified=bool(policy.certified),
        n_cal=int(n_cal),
        n_test=int(np.asarray(exits).shape[0]),
        unit=unit,
        exit_counts=tuple(int(c) for c in np.bincount(taken, minlength=n_exits)),
        mean_exit=float(taken.mean()) if taken.size else None,
        flops_saving=float(flops_saving),
        speeds=tuple(speeds),
        baseline=baseline,
        measures=tuple(measures),
        quality=quality,
        counted=counted,
    )


def speed(timing: Mapping[str, float], *, unit: str = "ms per image") -> Speed:
    """A :class:`Speed` from :func:`time_inference`'s side-by-side timing."""
    return Speed(
        batch_size=int(timing["batch_size"]),
        speedup=float(timing["measured_speedup"]),
        baseline=float(timing["full_ms_per_image"]),
        early=float(timing["early_exit_ms_per_image"]),
        unit=unit,
        predicted=timing.get("predicted_speedup"),
    )


def npz_writer(**arrays: Any) -> Callable[[Any], None]:
    """A file writer of the arrays as a compressed ``.npz`` (no pickles)."""

    def write(handle: Any) -> None:
        np.savez_compressed(handle, **arrays)

    return write


def table_writer(
    tables: Mapping[str, np.ndarray],
    *,
    loss_bound: float,
    risk: str,
    model: EarlyExitNetwork | None = None,
    confidence: str | None = None,
) -> Callable[[Any], None]:
    """A loss table as ``exitguard calibrate FILE`` reads it.

    Holds ``losses`` (K, n), ``cost`` (K, n) FLOPs, ``thresholds`` (K,), ``exits`` (K, n)
    (0-based), ``loss_bound``, ``risk`` and ``cost_unit`` ("FLOPs"); with ``model``, also
    the fields that bind a policy calibrated on it to the network (``model_fingerprint``,
    ``n_exits``, ``confidence_name``).
    """
    arrays: dict[str, Any] = {
        "losses": np.asarray(tables["losses"], dtype=np.float64),
        "cost": np.asarray(tables["cost"], dtype=np.float64),
        "thresholds": np.asarray(tables["thresholds"], dtype=np.float64),
        "exits": np.asarray(tables["exits"]).astype(np.int16),
        "loss_bound": np.float64(loss_bound),
        "risk": np.str_(risk),
        "cost_unit": np.str_("FLOPs"),
    }
    if model is not None:
        arrays["model_fingerprint"] = np.str_(model.fingerprint)
        arrays["n_exits"] = np.int64(model.n_exits)
        arrays["confidence_name"] = np.str_(confidence or model.confidence)
    return npz_writer(**arrays)


def evaluate_risk(
    losses: np.ndarray,
    *,
    cost: np.ndarray,
    exits: np.ndarray,
    loss_bound: float,
    title: str,
    procedures: Sequence[str],
    target_risks: Sequence[float],
    delta: float,
    n_cal: int,
    trials: int,
    seed: int,
    note: str = "",
) -> RiskResult:
    """Repeated-split evaluation of one loss table, as the report reads it.

    ``cost`` (K, N) is the compute (FLOPs) and ``exits`` (K, N) the 0-based exit taken. One
    evaluation selects a row per split and procedure; the mean exit is then read off the
    same selections on the same test splits (:func:`exit_evaluation`), so the FLOPs saving
    and the mean exit describe the very same policies.
    """
    n_total = np.shape(losses)[1]
    # The splits evaluate(n_cal=, trials=, seed=) draws (its first draws from the seed); given
    # as such, evaluate also draws the same reading orders, so the public call repeats these
    # numbers exactly.
    splits = split_indices(n_total, n_cal, trials, np.random.default_rng(seed))  # (T, n_cal)
    by_flops = evaluate(
        losses,
        cost=cost,
        procedures=tuple(procedures),
        target_risks=tuple(target_risks),
        delta=delta,
        n_cal=n_cal,
        trials=trials,
        loss_bound=loss_bound,
        seed=seed,
        return_selections=True,
    )
    by_exit = exit_evaluation(by_flops, exits, splits=splits)
    plain = {"selections": None, "order_seeds": None}  # the page keeps the summaries only
    return RiskResult(
        title=title,
        loss_bound=loss_bound,
        evaluation=dataclasses.replace(by_flops, **plain),
        evaluation_exits=dataclasses.replace(by_exit, **plain),
        note=note,
    )


def exit_evaluation(evaluation: Evaluation, exits: np.ndarray, *, splits: np.ndarray) -> Evaluation:
    """``evaluation`` with the mean exit as its cost: the same selections on the same splits.

    ``exits`` (K, N) is the 0-based exit of every sample under every row and ``splits``
    (T, n_cal) the calibration indices ``evaluation`` ran on (with ``return_selections``).
    Equals ``evaluate(losses, cost=exits, splits=splits, seed=...)`` with the evaluation's
    own seed, without selecting again.
    """
    table = np.asarray(exits, dtype=np.float64)  # (K, N)
    trials, n_cal = splits.shape
    n_test = table.shape[1] - n_cal
    total = table.sum(axis=1)  # (K,)
    full_exit = float(table[0].mean())
    rows = []
    seen: dict[str, int] = {}  # rows come per procedure, in the order of the target risks
    for row in evaluation.rows:  # a loop over the (procedure, target risk) rows
        e = seen[row.procedure] = seen.get(row.procedure, -1) + 1
        chosen = evaluation.selected_rows(row.procedure)[:, e]  # (T,)
        calibration = table[chosen[:, None], splits].sum(axis=1)  # (T,)
        test = (total[chosen] - calibration) / n_test  # (T,) mean exit on each test split
        mean = float(test.mean())
        rows.append(
            dataclasses.replace(
                row,
                mean_cost=mean,
                sd_cost=float(test.std(ddof=1)) if trials > 1 else 0.0,
                relative_saving=1.0 - mean / full_exit if full_exit else None,
            )
        )
    return dataclasses.replace(evaluation, rows=tuple(rows), full_cost=full_exit)


def loss_bound(risk: str) -> float:
    """B of one of exitguard's risks (2 for the Brier risks, 1 for the 0-1 risks)."""
    from exitguard.risk.losses import get_risk

    return float(get_risk(risk).loss_bound)


def evaluate_risks(
    names: Sequence[str],
    tables: Callable[[str], Mapping[str, np.ndarray]],
    *,
    options: PolicyOptions,
    n_cal: int,
    trials: int,
    loss_bound: Callable[[str], float],
    title: Callable[[str], str],
    note: Callable[[str], str] | None = None,
    keep: Callable[[str, Mapping[str, np.ndarray]], Any] | None = None,
) -> dict[str, RiskResult]:
    """Every risk's repeated-split evaluation (:func:`evaluate_risk`), behind a progress bar.

    ``tables(name)`` gives the risk's ``losses``, ``cost`` and ``exits`` (K, n); ``keep``
    receives each risk's tables once evaluated (e.g. to save them beside the report).
    """
    risks: dict[str, RiskResult] = {}
    for name in progress_bar(names, enabled=options.progress, desc="calibrating risks"):
        table = tables(name)
        risks[name] = evaluate_risk(
            table["losses"],
            cost=table["cost"],
            exits=table["exits"],
            loss_bound=loss_bound(name),
            title=title(name),
            note="" if note is None else note(name),
            procedures=options.procedures,
            target_risks=options.target_risks,
            delta=options.delta,
            n_cal=n_cal,
            trials=trials,
            seed=options.seed,
        )
        if keep is not None:
            keep(name, table)
    return risks


def image_dataset_info(
    data: Any,
    *,
    n_train: int,
    n_heldout: int,
    unit: str,
    note: str = "",
    extra: Mapping[str, Any] | None = None,
) -> DatasetInfo:
    """What a page says about an image dataset (:class:`~exitguard.data.images.ImageDataset`
    or one of scenes): its name, source, classes and image shape, and the sizes used."""
    return DatasetInfo(
        name=data.name,
        source=data.source,
        n_train=n_train,
        n_heldout=n_heldout,
        unit=unit,
        note=note,
        classes=tuple(data.class_names),
        extra={"image_shape": list(data.image_shape), **(extra or {})},
    )


def demo_settings(
    options: PolicyOptions,
    *,
    n_cal: int,
    trials: int,
    table_target_risks: Sequence[float],
    confidence: str,
    extra: Mapping[str, Any] | None = None,
) -> Settings:
    """The calibration settings a demo's page states."""
    return Settings(
        delta=options.delta,
        n_cal=n_cal,
        trials=trials,
        target_risks=tuple(options.target_risks),
        table_target_risks=tuple(table_target_risks),
        procedures=tuple(options.procedures),
        seed=options.seed,
        confidence=confidence,
        extra=dict(extra or {}),
    )


def calibration_split(n: int, n_cal: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, test) indices of the one policy a demo runs for real: a random split
    of ``n`` held-out samples, seeded by ``seed + 1`` (the splits of the evaluation use
    ``seed``)."""
    order = np.random.default_rng(seed + 1).permutation(n)
    calibration, test = np.split(order, [n_cal])
    return calibration, test


def calibrate_quietly(
    table: Mapping[str, np.ndarray],
    *,
    risk: str,
    loss_bound: float,
    target_risk: float,
    delta: float,
    procedure: str,
    confidence: str,
    n_exits: int,
    model_fingerprint: str,
) -> ExitPolicy:
    """A policy calibrated on a loss table, recording the model it belongs to.

    When nothing can be certified it is the full model, which the demo reports (so the
    warning is not shown).
    """
    from exitguard.calibration import calibrate_table

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an uncertified policy is reported, not warned about
        policy = calibrate_table(
            table["losses"],
            target_risk=target_risk,
            delta=delta,
            procedure=procedure,
            loss_bound=loss_bound,
            cost=table["cost"],
            thresholds=table["thresholds"],
            risk=risk,
            confidence=confidence,
        )
    return policy.with_model(
        n_exits=n_exits, model_fingerprint=model_fingerprint, confidence=confidence
    )


def time_policy(
    network: EarlyExitNetwork,
    images: Tensor,
    threshold: float,
    *,
    batch_size: int,
    batch1_images: int,
    repeats: int,
    progress: bool,
    profile: Any = None,
) -> list[Speed]:
    """Early exit against the full model, side by side, at ``batch_size`` on all ``images``
    and at batch 1 on the first ``batch1_images`` (with half the repeats)."""
    timings = [
        time_inference(
            network,
            images,
            threshold,
            batch_size=batch_size,
            repeats=repeats,
            progress=progress,
            profile=profile,
        ),
        time_inference(
            network,
            images[:batch1_images],
            threshold,
            batch_size=1,
            repeats=max(1, repeats // 2),
            progress=progress,
            profile=profile,
        ),
    ]
    return [speed(timing) for timing in timings]


def accuracy_measures(
    predictions: np.ndarray,
    full_predictions: np.ndarray,
    labels: np.ndarray,
    *,
    exits_match: bool,
) -> tuple[list[tuple[str, Any]], str]:
    """The timed policy's accuracy against the full model's on the same test samples: the
    page's measures and the summary's phrase."""
    full = float((full_predictions == labels).mean())
    early = float((predictions == labels).mean())
    measures: list[tuple[str, Any]] = [
        ("test accuracy, full model", full),
        ("test accuracy, early exit", early),
        ("test risk (accuracy drop)", full - early),
        ("real exits equal simulated exits", exits_match),
    ]
    return measures, f"accuracy {early:.3f} against {full:.3f} for the full model"


def exit_output_files(
    probs: np.ndarray,
    labels: np.ndarray,
    splits: Mapping[str, np.ndarray],
    *,
    exit_cost: np.ndarray,
) -> dict[str, Callable[[Any], None]]:
    """Held-out per-exit outputs as ``exits_<split>.npz`` writers, split as the timed policy
    used them: ``probs`` (n, L, C) float32, ``labels`` (n,), ``exit_cost`` (L,) and
    ``exit_cost_unit`` ("FLOPs"), what ``exitguard calibrate`` and ``exitguard apply`` read."""
    return {
        f"exits_{name}.npz": npz_writer(
            probs=np.asarray(probs)[index].astype(np.float32),
            labels=np.asarray(labels)[index],
            exit_cost=np.asarray(exit_cost, dtype=np.float64),
            exit_cost_unit=np.str_("FLOPs"),
        )
        for name, index in splits.items()
    }


def write_demo_report(
    results: DemoResults | DriftResults,
    options: DemoOptions,
    *,
    policy: ExitPolicy,
    files: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Write a demo's report to ``options.out`` with its data files and ``policy.json``."""
    from exitguard.report import write_report

    log(f"drawing the plots and writing the report to {options.out}")
    data = dict(files or {})
    data["policy.json"] = (json.dumps(policy.to_dict(), indent=2) + "\n").encode()
    return write_report(results, Path(options.out), data=data)
