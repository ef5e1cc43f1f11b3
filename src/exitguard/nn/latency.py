"""Latency as a cost: measured time of every stage and exit head, per batch size.

Users pay in milliseconds, not FLOPs: early high-resolution stages are often memory-bound and
take a larger share of the time than of the FLOPs, and an exit head that looks cheap in FLOPs
may not be. :func:`profile_latency` measures, on the user's machine, each stage and each exit
head at several batch sizes (warm-up, repeats, median and spread; threads and versions
recorded); a :class:`LatencyProfile` then

* predicts the wall time of serving a batch under a policy (:meth:`LatencyProfile.batch_ms`):
  stage ``l`` runs on the samples that reach it, so its time is read at that many samples;
* gives a per-sample cost table in milliseconds for the risk core
  (:meth:`LatencyProfile.cost_table`): at a stated batch size ``B``, a sample that leaves at
  exit ``e`` is charged its share ``t_l(B) / B`` of every stage and head up to ``e`` plus the
  compaction of the batch at each exit where samples leave, so that calibration and reports
  can optimise and show time, not only FLOPs.

Profiles are small JSON documents saved beside a policy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from torch import Tensor

from exitguard._files import atomic_write_text, load_json
from exitguard.nn._modes import eval_mode
from exitguard.nn.network import EarlyExitNetwork, all_finite
from exitguard.risk._validation import check_int

_SCHEMA = "exitguard.LatencyProfile"


@dataclasses.dataclass(frozen=True)
class LatencyProfile:
    """Measured milliseconds per call of every stage and exit head, at several batch sizes.

    Attributes
    ----------
    batch_sizes : tuple of int (S,)
    stage_ms, head_ms : tuple of tuples (S, L)
        Median milliseconds of one call of stage/head ``l`` on a batch of that size.
    stage_spread_ms, head_spread_ms : tuple of tuples (S, L)
        Interquartile range of the same measurements.
        A head's time includes the exit decision (softmax and confidence).
    compaction_ms : tuple of float (S,)
        Median milliseconds of compacting a batch of that size (selecting the samples that
        go on, as ``infer`` does after an exit fires).
    resize_ms : tuple of float (S,)
        Median milliseconds of what ``infer`` does with that many leaving samples of a
        network with ``resize``: the resize, softmax, the check for non-finite logits and
        the predictions (empty for a network without ``resize``).
    copy_ms : tuple of float (S,)
        Median milliseconds of writing that many leaving samples' outputs (logits and
        probabilities) into the batch's result, which ``infer`` does for every group of
        samples leaving when a batch does not leave all at once (empty in profiles saved
        before it was measured).
    threads : int
        ``torch.get_num_threads()`` while measuring.
    torch_version, machine : str
    repeats, warmup : int
    """

    batch_sizes: tuple[int, ...]
    stage_ms: tuple[tuple[float, ...], ...]
    head_ms: tuple[tuple[float, ...], ...]
    stage_spread_ms: tuple[tuple[float, ...], ...]
    head_spread_ms: tuple[tuple[float, ...], ...]
    compaction_ms: tuple[float, ...]
    threads: int
    torch_version: str
    machine: str
    repeats: int
    warmup: int
    resize_ms: tuple[float, ...] = ()
    copy_ms: tuple[float, ...] = ()

    @property
    def n_exits(self) -> int:
        return len(self.stage_ms[0])

    def _at(self, table: Sequence[Sequence[float]] | Sequence[float], n: ArrayLike) -> Any:
        """Milliseconds at batch size ``n`` by linear interpolation in the batch size (0 at 0)."""
        sizes = np.concatenate([[0.0], np.asarray(self.batch_sizes, dtype=np.float64)])
        values = np.asarray(table, dtype=np.float64)
        values = np.concatenate([np.zeros((1, *values.shape[1:])), values], axis=0)
        n = np.asarray(n, dtype=np.float64)
        if values.ndim == 1:
            return np.interp(n, sizes, values)
        columns = [np.interp(n, sizes, values[:, e]) for e in range(values.shape[1])]
        return np.stack(columns, -1)

    def exit_ms(self, batch_size: int) -> NDArray[np.float64]:
        """(L,) per-sample share of a batch of ``batch_size`` for leaving at each exit.

        Stages and heads ``0..e`` (the last exit's head is part of the full model), plus one
        compaction at each earlier exit (the batch is compacted where samples leave).
        """
        per_sample = self._at(self.stage_ms, batch_size) + self._at(self.head_ms, batch_size)
        per_sample = per_sample / batch_size  # (L,)
        compaction = float(self._at(self.compaction_ms, batch_size)) / batch_size
        cumulative = np.cumsum(per_sample)
        return cumulative + compaction * np.arange(self.n_exits) + self._resize_at(batch_size)

    def _resize_at(self, n: ArrayLike) -> Any:
        """Per-sample milliseconds of resizing ``n`` leaving samples (0 without ``resize``)."""
        if not self.resize_ms:
            return np.zeros(np.shape(n))
        n = np.asarray(n, dtype=np.float64)
        return self._at(self.resize_ms, n) / np.maximum(n, 1.0)

    def cost_table(self, exits: ArrayLike, *, batch_size: int) -> NDArray[np.float64]:
        """Milliseconds each sample spends, for exits (..., n): the risk core's ``cost``."""
        return self.exit_ms(batch_size)[np.asarray(exits, dtype=np.int64)]

    def full_ms(self, batch_size: int) -> float:
        """Per-sample milliseconds of the full model (no intermediate head runs)."""
        stages = self._at(self.stage_ms, batch_size).sum()
        head = self._at(self.head_ms, batch_size)[-1]
        return float(stages + head) / batch_size + float(self._resize_at(batch_size))

    def batch_ms(self, exits: ArrayLike) -> float:
        """Predicted milliseconds of serving one batch whose samples leave at ``exits`` (B,).

        Stage ``l`` and its head run on the samples that reach it (``n_l``), read from the
        profile at that batch size; a compaction runs after each exit where some leave; when
        the batch leaves in more than one group, each group's outputs are copied into the
        result (``copy_ms``, read at the group's size).
        """
        taken = np.asarray(exits, dtype=np.int64)
        counts = np.bincount(taken, minlength=self.n_exits)  # (L,) leaving at each exit
        reaching = len(taken) - np.concatenate([[0], np.cumsum(counts)[:-1]])  # (L,)
        stage = self._at(self.stage_ms, reaching)  # (L, L): row l read at n_l
        head = self._at(self.head_ms, reaching)
        diagonal = np.arange(self.n_exits)
        total = stage[diagonal, diagonal].sum() + head[diagonal, diagonal].sum()
        leaving_early = (counts[:-1] > 0) & (reaching[1:] > 0)
        total += float(np.sum(self._at(self.compaction_ms, reaching[:-1])[leaving_early]))
        total += float(np.sum(self._resize_at(counts) * counts))
        if self.copy_ms and np.count_nonzero(counts) > 1:  # outputs gathered group by group
            total += float(np.sum(self._at(self.copy_ms, counts[counts > 0])))
        return float(total)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": _SCHEMA, "schema_version": 1, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyProfile:
        if data.get("schema") != _SCHEMA:
            raise ValueError(f"not an exitguard latency profile (schema {_SCHEMA!r}).")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        for key in ("stage_ms", "head_ms", "stage_spread_ms", "head_spread_ms"):
            values[key] = tuple(tuple(float(x) for x in row) for row in values[key])
        values["batch_sizes"] = tuple(int(b) for b in values["batch_sizes"])
        values["compaction_ms"] = tuple(float(x) for x in values["compaction_ms"])
        values["resize_ms"] = tuple(float(x) for x in values.get("resize_ms", ()))
        values["copy_ms"] = tuple(float(x) for x in values.get("copy_ms", ()))
        return cls(**values)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the profile as JSON, atomically."""
        return atomic_write_text(
            path, json.dumps(self.to_dict(), indent=2) + "\n", argument="profile"
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LatencyProfile:
        return cls.from_dict(load_json(path, max_bytes=1 << 20, max_depth=4, argument="profile"))


def _time_ms(fn: Any, *, repeats: int, warmup: int) -> tuple[float, float]:
    """Median and interquartile range of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1000.0 * (time.perf_counter() - start))
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return statistics.median(times), quartiles[2] - quartiles[0]


@torch.inference_mode()
def profile_latency(
    network: EarlyExitNetwork,
    example: Tensor,
    *,
    batch_sizes: Sequence[int] = (1, 16, 64, 256),
    repeats: int = 15,
    warmup: int = 3,
) -> LatencyProfile:
    """Measure every stage and exit head of ``network`` at each batch size.

    ``example`` (N, ...) provides the inputs (repeated when a batch size exceeds N). Each
    stage is timed on its real input (the previous stage's output at that batch size), in
    eval mode, one call at a time; each head with the exit decision after it (softmax and
    confidence), as :meth:`EarlyExitNetwork.infer` runs it. Run it on an otherwise idle
    machine with the thread count you deploy with; both are recorded in the profile.

    The inputs keep ``example``'s memory format, and convolutions pass it on: give it the
    layout you serve. (A one-channel batch indexed out of a numpy array has the strides of
    channels-last, so torch runs the whole network channels-last: on the Fashion-MNIST
    segmenter 0.67 ms a scene at batch 64, against 0.87 ms for the same batch in the
    standard layout.)
    """
    if not isinstance(network, EarlyExitNetwork):
        raise TypeError(f"`network` must be an EarlyExitNetwork; got {type(network).__name__}.")
    sizes = tuple(sorted({int(b) for b in batch_sizes}))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"`batch_sizes` must be positive integers; got {tuple(batch_sizes)}.")
    stage_ms, head_ms, stage_iqr, head_iqr, compaction, resize, copy = [], [], [], [], [], [], []
    with eval_mode(network):
        for size in sizes:
            reps = -(-size // example.shape[0])
            x = torch.cat([example] * reps)[:size]  # (size, ...) in example's memory format
            stages, heads, s_iqr, h_iqr = [], [], [], []
            h = x
            for index, head in enumerate(network.heads):
                inputs = h
                median, iqr = _time_ms(
                    lambda index=index, inputs=inputs: network._run_stage(index, inputs),
                    repeats=repeats,
                    warmup=warmup,
                )
                stages.append(median)
                s_iqr.append(iqr)
                h = network._run_stage(index, inputs)
                median, iqr = _time_ms(
                    lambda head=head, h=h: _decide(network, head, h),
                    repeats=repeats,
                    warmup=warmup,
                )
                heads.append(median)
                h_iqr.append(iqr)
            keep = torch.ones(size, dtype=torch.bool)
            keep[::2] = False  # compact half of the batch, as after an exit
            features = network._run_stage(0, x)
            compaction_median, _ = _time_ms(
                lambda features=features, keep=keep: features[keep], repeats=repeats, warmup=warmup
            )
            if network.resize is not None:
                logits = network.heads[-1](h)  # (size, C, ...) the last exit's own output
                resize_median, _ = _time_ms(
                    lambda logits=logits: _leave(network, logits), repeats=repeats, warmup=warmup
                )
                resize.append(resize_median)
            logits = network._resized(network.heads[-1](h))  # (size, C, ...) as served
            copy_median, _ = _time_ms(
                lambda logits=logits: _gather(logits), repeats=repeats, warmup=warmup
            )
            copy.append(copy_median)
            stage_ms.append(tuple(stages))
            head_ms.append(tuple(heads))
            stage_iqr.append(tuple(s_iqr))
            head_iqr.append(tuple(h_iqr))
            compaction.append(compaction_median)
    return LatencyProfile(
        batch_sizes=sizes,
        stage_ms=tuple(stage_ms),
        head_ms=tuple(head_ms),
        stage_spread_ms=tuple(stage_iqr),
        head_spread_ms=tuple(head_iqr),
        compaction_ms=tuple(compaction),
        threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
        repeats=repeats,
        warmup=warmup,
        resize_ms=tuple(resize),
        copy_ms=tuple(copy),
    )


def _gather(logits: Tensor) -> None:
    """Write leaving samples' logits and probabilities into a batch result, as ``infer``."""
    rows = torch.arange(logits.shape[0], device=logits.device)  # (B,)
    logits.new_empty(logits.shape)[rows] = logits
    logits.new_empty(logits.shape)[rows] = logits  # the probabilities, the same size


def _leave(network: EarlyExitNetwork, logits: Tensor) -> Tensor:
    """What ``infer`` does for samples that leave a network with ``resize``: resize, softmax,
    the check for non-finite logits and the predictions (argmax)."""
    resized = network.resize(logits)  # (B, C, *S_out)
    all_finite(resized)
    return resized.softmax(dim=1).max(dim=1).indices  # (B, *S_out)


def _decide(network: EarlyExitNetwork, head: Any, h: Tensor) -> Tensor:
    """A head and the exit decision after it: logits, softmax, confidence (as infer does)."""
    probs = head(h).softmax(dim=1)  # (B, C, ...)
    if network._confidence_pointwise:
        return network._confidence_of(probs.unsqueeze(1))[:, 0]  # (B,)
    return probs


@dataclasses.dataclass(frozen=True)
class SpeedupMeasurement:
    """Early-exit against full-model inference on the same data, timed side by side.

    Attributes
    ----------
    batch_size, n : int
        Served in batches of ``batch_size``; ``n`` samples in all.
    full_ms, early_ms : float
        Median milliseconds per sample of the full model (``math.inf``) and of the policy.
    measured_speedup : float
        ``full_ms / early_ms``.
    predicted_speedup : float or None
        What the latency profile predicts for the same exits (None without a profile).
    flops_speedup : float or None
        Full-model FLOPs over the FLOPs of the exits taken (None without a FLOPs table).
    mean_exit : float
        Mean 0-based exit taken.
    repeats, threads : int
    """

    batch_size: int
    n: int
    full_ms: float
    early_ms: float
    measured_speedup: float
    predicted_speedup: float | None
    flops_speedup: float | None
    mean_exit: float
    repeats: int
    threads: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@torch.inference_mode()
def measure_speedup(
    network: EarlyExitNetwork,
    x: Tensor,
    policy: Any,
    *,
    batch_size: int,
    repeats: int = 7,
    warmup: int = 1,
    profile: LatencyProfile | None = None,
    flops: Any = None,
    allow_unbound: bool = False,
    tick: Any = None,
) -> SpeedupMeasurement:
    """Time ``network.infer`` under ``policy`` and under the full model, interleaved.

    Each repeat serves all of ``x`` in batches of ``batch_size`` both ways, alternating
    which goes first (so that a drift in the machine's load falls on both alike); the
    medians over repeats are compared. With a ``profile`` (:func:`profile_latency`) the
    predicted speed-up of the same exits is given beside it, with ``flops`` (a
    :class:`~exitguard.nn.FlopsTable`) the FLOPs speed-up: three views of one saving.
    ``tick``, if given, is called after every timed run (a progress bar's ``update``).
    """
    check_int(batch_size, "batch_size")
    check_int(repeats, "repeats")
    check_int(warmup, "warmup", minimum=0)
    batches = list(torch.split(x, batch_size))
    exits = [network.infer(b, policy, allow_unbound=allow_unbound).exits.cpu() for b in batches]

    def early() -> None:
        for batch in batches:
            network.infer(batch, policy, allow_unbound=allow_unbound)

    def full() -> None:
        for batch in batches:
            network.infer(batch, math.inf)

    for _ in range(warmup):
        full()
        early()
        if tick is not None:
            tick(2)
    times: dict[str, list[float]] = {"full": [], "early": []}
    for repeat in range(repeats):
        order = (("full", full), ("early", early))
        for name, run in order if repeat % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            run()
            times[name].append(1000.0 * (time.perf_counter() - start) / len(x))
            if tick is not None:
                tick(1)
    full_ms, early_ms = statistics.median(times["full"]), statistics.median(times["early"])
    taken = torch.cat(exits).numpy()  # (n,)
    predicted = None
    if profile is not None:
        served = sum(profile.batch_ms(e.numpy()) for e in exits)
        whole = sum(profile.full_ms(len(b)) * len(b) for b in batches)
        predicted = whole / served
    flops_speedup = None
    limits = network._limits(network.check_policy(policy, allow_unbound=allow_unbound))
    if flops is not None and all(math.isinf(t) for t in limits):
        flops_speedup = 1.0  # never exits early: no intermediate head runs
    elif flops is not None:
        flops_speedup = float(flops.full) * len(taken) / float(np.sum(flops.to_exit[taken]))
    return SpeedupMeasurement(
        batch_size=batch_size,
        n=len(x),
        full_ms=full_ms,
        early_ms=early_ms,
        measured_speedup=full_ms / early_ms,
        predicted_speedup=predicted,
        flops_speedup=flops_speedup,
        mean_exit=float(taken.mean()),
        repeats=repeats,
        threads=torch.get_num_threads(),
    )
