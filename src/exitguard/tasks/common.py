"""Plumbing shared by the task demos: the model cache, timing, progress and result headers.

Every task (classification, segmentation, diffusion) trains a small model here once and
caches it; every demo checks its calibrated policies over repeated splits and writes a results
dict that :func:`exitguard.report.write_report` turns into a report folder.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

import exitguard
from exitguard.evaluation import evaluate
from exitguard.nn import EarlyExitNetwork, TrainConfig, train_exits
from exitguard.nn.io import default_file_mode
from exitguard.report import RESULTS_SCHEMA

PROCEDURES = ("naive", "crc", "ucb-wsr", "ltt")
"""The procedures every demo compares."""


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


class JointTraining(Protocol):
    """The training settings :func:`train_jointly` reads."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    distill: float
    seed: int


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
    torch version). An entry whose JSON is unreadable, whose hash does not match or whose
    weights do not load into ``build()`` is trained again; nothing is ever unpickled.

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
    """
    canonical = json.loads(json.dumps(dict(description)))  # as it reads back from the cache
    key = hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "models"
    weights_path = folder / f"{name}-{key}.safetensors"
    meta_path = weights_path.with_suffix(".json")
    import safetensors.torch

    if weights_path.is_file() and meta_path.is_file():
        try:
            metadata = json.loads(meta_path.read_text(encoding="utf-8"))
            if metadata.get("description") != canonical:
                raise ValueError("the cache entry describes another model")
            if metadata.get("sha256") != sha256_file(weights_path):
                raise ValueError("the weights do not match their recorded hash")
            module = build()
            missing, unexpected = safetensors.torch.load_model(
                module, str(weights_path), strict=False
            )
            if missing or unexpected:
                raise ValueError(f"missing {sorted(missing)}, unexpected {sorted(unexpected)}")
            module.eval()
            return CachedModel(module, metadata, from_cache=True)
        except (ValueError, OSError, RuntimeError, json.JSONDecodeError) as error:
            log(f"cached model at {weights_path} is unusable ({error}); training again")
    torch.manual_seed(seed)  # the same initial weights for the same seed
    module = build()
    start = time.perf_counter()
    extra = dict(train(module))
    seconds = time.perf_counter() - start
    module.eval()
    folder.mkdir(parents=True, exist_ok=True)
    temporary = weights_path.with_name(f".{weights_path.name}.tmp")
    safetensors.torch.save_model(module, str(temporary))
    default_file_mode(temporary)
    os.replace(temporary, weights_path)
    metadata = {
        "description": canonical,
        "sha256": sha256_file(weights_path),
        "train_seconds": seconds,
        **extra,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    temporary_meta = meta_path.with_name(f".{meta_path.name}.tmp")
    temporary_meta.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary_meta, meta_path)
    return CachedModel(module, metadata, from_cache=False)


def median_seconds(fn: Callable[[], Any], *, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_inference(
    network: EarlyExitNetwork,
    images: Tensor,
    threshold: float,
    *,
    batch_size: int,
    repeats: int,
) -> dict[str, float]:
    """Median seconds per image of early-exit and full-model inference, run side by side."""
    batches = list(torch.split(images, batch_size))

    def run(value: float) -> None:
        for batch in batches:
            network.infer(batch, value)

    full = median_seconds(lambda: run(math.inf), repeats=repeats)
    early = median_seconds(lambda: run(threshold), repeats=repeats)
    return {
        "batch_size": batch_size,
        "full_ms_per_image": 1000 * full / len(images),
        "early_exit_ms_per_image": 1000 * early / len(images),
        "measured_speedup": full / early,
    }


def progress_bar(iterable: Iterable[Any], *, enabled: bool, desc: str) -> Iterable[Any]:
    """``iterable`` wrapped in a tqdm bar when enabled and tqdm is installed."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, leave=False)


def machine_info() -> dict[str, Any]:
    """Python and torch versions and torch's thread count, for result files."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def results_header(task: str, title: str) -> dict[str, Any]:
    """The fields every demo's results dict starts with (schema, versions, machine)."""
    return {
        "schema": RESULTS_SCHEMA,
        "schema_version": 1,
        "task": task,
        "title": title,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "exitguard_version": exitguard.__version__,
        "machine": machine_info(),
    }


def evaluate_risk(
    losses: np.ndarray,
    *,
    cost: np.ndarray,
    exits: np.ndarray,
    loss_bound: float,
    procedures: Sequence[str],
    target_risks: Sequence[float],
    delta: float,
    n_cal: int,
    trials: int,
    seed: int,
) -> dict[str, Any]:
    """Repeated-split evaluation of one loss table, as the report reads it.

    ``cost`` (K, N) is the compute (FLOPs) and ``exits`` (K, N) the 0-based exit taken; both
    use the same splits (same seed), so the FLOPs saving and the mean exit describe the
    same selections.
    """
    common: dict[str, Any] = dict(
        procedures=tuple(procedures),
        target_risks=tuple(target_risks),
        delta=delta,
        n_cal=n_cal,
        trials=trials,
        loss_bound=loss_bound,
        seed=seed,
    )
    by_flops = evaluate(losses, cost=cost, **common)
    by_exit = evaluate(losses, cost=np.asarray(exits, dtype=np.float64) + 1.0, **common)
    return {
        "loss_bound": loss_bound,
        "evaluation": by_flops.to_dict(),
        "evaluation_exits": by_exit.to_dict(),
    }
