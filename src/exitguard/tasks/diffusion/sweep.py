"""Loss and cost tables for early-exit diffusion sampling, by sweeping a threshold grid.

A policy changes the trajectory it denoises, so the table comes from sampling every noise
seed once per candidate threshold (DESIGN.md). Every threshold sees the same noise per sample
and step (:func:`exitguard.tasks.diffusion.sample.sample_noise`), so row ``k`` differs from
row 0 (``inf``, the full model) only through the exits taken. Per-sample losses compare each
row's image with the full model's image from the same noise (:mod:`.losses`); row 0 is
loss-free by construction. Cost: FLOPs of one sample summed over the ``T`` steps.

One call samples a batch of noise seeds under all K thresholds at once, as ``K x b`` rows of
one early-exit sampler (rows leave the batch at each step as they exit), so only row 0 runs
the full model; the other rows pay for the blocks they use. Such a call is a *cell*
(:func:`sweep_cell`: a block of samples x a group of grid rows); the sweep is a loop over
cells, and :mod:`exitguard.distributed` computes the same cells on a Ray cluster.

The threshold grid is chosen on a *pilot* set of noise seeds (stream 1, never used for
calibration or testing, which use stream 0): :func:`pilot_thresholds` runs the full model on
them, records every candidate exit's confidence at every step, and places thresholds at
quantiles of the best candidate confidence per (sample, step), so that the k-th threshold
lets a share ``q_k`` of the pilot's steps leave early. The shares are evenly spaced in
log-odds from ``smallest_share`` to ``1 - smallest_share``: dense at the safe end, where
small target risks are decided, and at the aggressive end, where the last (least noisy)
steps start to exit and the losses grow fastest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from torch import Tensor

from exitguard._files import atomic_write
from exitguard.risk._validation import check_int
from exitguard.tasks.common import progress_bar
from exitguard.tasks.diffusion.losses import LOSSES, ssim_loss
from exitguard.tasks.diffusion.model import Denoiser, exit_flops
from exitguard.tasks.diffusion.sample import sample, sample_noise, simulate, to_unit

PILOT_STREAM = 1
"""The noise stream of the pilot samples that place the threshold grid."""

LossFn = Callable[[Tensor, Tensor], Tensor]


def grid_from_confidences(
    confidence: ArrayLike,
    *,
    earliest_exit: int,
    count: int = 24,
    smallest_share: float = 0.002,
) -> NDArray[np.float64]:
    """A threshold grid from pilot confidences: ``inf``, then ``count - 1`` decreasing values.

    Parameters
    ----------
    confidence : array of shape (..., L - 1)
        Every intermediate exit's confidence, e.g. (samples, steps, L - 1) from
        :func:`exitguard.tasks.diffusion.sample.simulate` on the full model.
    earliest_exit : int
        Exits before it never fire, so their confidences are ignored.
    count : int
        Grid size K (>= 3), ``inf`` and the final 0 included; duplicates (ties in the
        confidences) are dropped, so the grid can come out shorter.
    smallest_share : float in (0, 0.5)
        The share of pilot steps that exit early under the safest finite threshold (and
        that stay under the most aggressive one before 0).

    Returns
    -------
    float64 array of shape (K',)
        ``[inf, t_1, ..., t_{K-2}, 0.0]``, strictly decreasing: ``t_k`` is the ``1 - q_k``
        quantile of the best candidate confidence per step, with ``q_k`` evenly spaced in
        log-odds from ``smallest_share`` to ``1 - smallest_share``.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    if conf.ndim < 1 or conf.shape[-1] < 1:
        raise ValueError(f"`confidence` must be (..., L - 1) with L >= 2; got {conf.shape}.")
    if isinstance(earliest_exit, bool) or not 0 <= earliest_exit < conf.shape[-1]:
        raise ValueError(
            f"`earliest_exit` must be an integer in [0, {conf.shape[-1] - 1}] for a grid (a "
            f"later exit is the last one, which never exits early); got {earliest_exit!r}."
        )
    if isinstance(count, bool) or not isinstance(count, int) or count < 3:
        raise ValueError(f"`count` must be an integer >= 3; got {count!r}.")
    if not 0.0 < smallest_share < 0.5:
        raise ValueError(f"`smallest_share` must be a float in (0, 0.5); got {smallest_share!r}.")
    best = conf[..., earliest_exit:].max(axis=-1).ravel()  # (M,) best candidate per step
    edge = math.log(smallest_share / (1.0 - smallest_share))
    shares = 1.0 / (1.0 + np.exp(-np.linspace(edge, -edge, count - 2)))  # (K-2,) increasing
    values = np.quantile(best, 1.0 - shares)  # (K-2,) decreasing
    finite = np.unique(np.clip(np.round(np.append(values, 0.0), 10), 0.0, 1.0))[::-1]
    return np.concatenate([[math.inf], finite])


def pilot_thresholds(
    model: Denoiser,
    *,
    seed: int,
    n: int = 64,
    count: int = 24,
    earliest_exit: int = 1,
    smallest_share: float = 0.002,
) -> NDArray[np.float64]:
    """The threshold grid of :func:`grid_from_confidences` on ``n`` pilot samples.

    The pilot samples are noise stream :data:`PILOT_STREAM` of ``seed``, disjoint from the
    samples a sweep tabulates (stream 0), so the grid is chosen without looking at them.
    """
    noise = sample_noise(
        np.arange(n),
        seed=seed,
        steps=model.config.steps,
        image_shape=model.config.image_shape,
        stream=PILOT_STREAM,
    )
    pilot = simulate(model, noise, threshold=math.inf, earliest_exit=earliest_exit)
    if pilot.confidence is None:  # pragma: no cover - simulate records them
        raise RuntimeError("simulate returned no confidences")
    return grid_from_confidences(
        pilot.confidence.numpy(),
        earliest_exit=earliest_exit,
        count=count,
        smallest_share=smallest_share,
    )


def step_costs(flops: Mapping[str, Any]) -> NDArray[np.float64]:
    """(L,) FLOPs of a step that leaves at each exit, from :func:`exit_flops`."""
    return np.asarray(flops["to_exit"], dtype=np.float64)


def sample_costs(
    exits: ArrayLike, thresholds: ArrayLike, flops: Mapping[str, Any]
) -> NDArray[np.float64]:
    """FLOPs per sample summed over steps.

    Parameters
    ----------
    exits : int array of shape (K, N, T)
        The exit of each sample at each step under each threshold.
    thresholds : array of shape (K,)
        Rows whose threshold is ``inf`` run no UEM: each step costs ``flops["full"]``.
    flops : mapping
        From :func:`exitguard.tasks.diffusion.model.exit_flops`.

    Returns
    -------
    float64 array of shape (K, N)
    """
    taken = np.asarray(exits, dtype=np.int64)  # (K, N, T)
    grid = np.asarray(thresholds, dtype=np.float64)  # (K,)
    cost = step_costs(flops)[taken].sum(axis=-1)  # (K, N)
    cost[np.isposinf(grid)] = float(flops["full"]) * taken.shape[-1]
    return cost


@dataclasses.dataclass(frozen=True, repr=False)
class DiffusionSweep:
    """Losses and costs of every noise seed under every threshold.

    Attributes
    ----------
    thresholds : float64 array of shape (K,)
        The grid, ``thresholds[0] = inf`` (the full model), then decreasing.
    losses : mapping of str to float64 arrays of shape (K, N)
        Each of :data:`~exitguard.tasks.diffusion.losses.LOSSES` that was computed; row 0 is
        zero, every value lies in [0, 1].
    cost : float64 array of shape (K, N)
        FLOPs per sample, summed over the T steps.
    exits : int8 array of shape (K, N, T)
        The exit of each sample at each step (step ``s`` denoises timestep ``T - 1 - s``).
    images : float32 array of shape (K, N, C, H, W)
        The generated images in [0, 1].
    indices : int64 array of shape (N,)
        The sample indices (noise seeds ``[seed, stream, index]``).
    seed, stream, earliest_exit, n_exits : int
    flops : dict
        :func:`exitguard.tasks.diffusion.model.exit_flops` of the model.
    seconds : float
        Wall time of the sweep.
    """

    thresholds: NDArray[np.float64]
    losses: dict[str, NDArray[np.float64]]
    cost: NDArray[np.float64]
    exits: NDArray[np.int8]
    images: NDArray[np.float32]
    indices: NDArray[np.int64]
    seed: int
    stream: int
    earliest_exit: int
    n_exits: int
    flops: dict[str, Any]
    seconds: float

    def __repr__(self) -> str:
        k, n, steps = self.exits.shape
        means = {name: np.round(table.mean(1), 4).tolist() for name, table in self.losses.items()}
        return (
            f"DiffusionSweep(K={k}, N={n}, T={steps}, "
            f"mean_exit={np.round(self.mean_exit.mean(1), 2).tolist()}, mean_losses={means})"
        )

    @property
    def mean_exit(self) -> NDArray[np.float64]:
        """(K, N) float64: each sample's exit averaged over the steps (0-based)."""
        return self.exits.mean(axis=-1, dtype=np.float64)

    def table(self, loss: str = "ssim") -> NDArray[np.float64]:
        """The (K, N) losses of one computed loss."""
        if loss not in self.losses:
            raise ValueError(
                f"`loss` must be one of the computed losses {sorted(self.losses)}; got {loss!r}."
            )
        return self.losses[loss]

    def save(self, path: str | os.PathLike[str], *, loss: str = "ssim") -> Path:
        """Write the table in the risk core's npz format (see :func:`write_table`)."""
        return write_table(self, path, loss=loss)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DiffusionSweep:
        """Read a table written by :meth:`save` (images are not stored: empty array)."""
        with np.load(Path(path), allow_pickle=False) as data:
            losses = {
                key.removeprefix("loss_"): data[key] for key in data.files if key[:5] == "loss_"
            }
            losses.pop("bound", None)
            meta = json.loads(str(data["settings"]))
            return cls(
                thresholds=data["thresholds"],
                losses=losses,
                cost=data["cost"],
                exits=data["exits"],
                images=np.zeros((0,), dtype=np.float32),
                indices=data["indices"],
                seed=int(meta["seed"]),
                stream=int(meta["stream"]),
                earliest_exit=int(meta["earliest_exit"]),
                n_exits=int(meta["n_exits"]),
                flops=meta["flops"],
                seconds=float(meta["seconds"]),
            )


def table_npz(sweep: DiffusionSweep, handle: Any, *, loss: str = "ssim") -> None:
    """Write a sweep's loss table as npz to a binary handle (the format of :func:`write_table`)."""
    arrays: dict[str, Any] = {
        "losses": sweep.table(loss),
        "cost": sweep.cost,
        "thresholds": sweep.thresholds,
        "exits": sweep.exits,
        "mean_exit": sweep.mean_exit,
        "indices": sweep.indices,
        "loss_bound": np.float64(1.0),
        "risk": np.str_(loss),
        "settings": np.str_(
            json.dumps(
                {
                    "seed": sweep.seed,
                    "stream": sweep.stream,
                    "earliest_exit": sweep.earliest_exit,
                    "n_exits": sweep.n_exits,
                    "flops": sweep.flops,
                    "seconds": sweep.seconds,
                    "cost_unit": "FLOPs per sample, summed over the denoising steps",
                },
                sort_keys=True,
            )
        ),
    }
    for name, table in sweep.losses.items():
        arrays[f"loss_{name}"] = table
    np.savez_compressed(handle, **arrays)


def write_table(sweep: DiffusionSweep, path: str | os.PathLike[str], *, loss: str = "ssim") -> Path:
    """Write a sweep as npz that ``exitguard calibrate FILE`` / ``evaluate FILE`` read.

    Keys: ``losses`` (K, N) of the chosen loss, ``cost`` (K, N) FLOPs, ``thresholds`` (K,),
    and extras: ``loss_<name>`` for every computed loss, ``exits`` (K, N, T) int8 (0-based),
    ``mean_exit`` (K, N), ``indices`` (N,), ``loss_bound`` (1.0), ``risk`` (the chosen loss)
    and ``settings`` (JSON: seed, stream, earliest exit, FLOPs). No pickles.
    """
    return atomic_write(
        Path(path), lambda handle: table_npz(sweep, handle, loss=loss), argument="path"
    )


def threshold_groups(count: int, per_batch: int | None) -> list[NDArray[np.int64]]:
    """Grid rows sampled together: consecutive runs of ``per_batch`` rows (all when None).

    The first group holds row 0 (``inf``, the full model), whose images are the reference of
    every row's losses.

    >>> [g.tolist() for g in threshold_groups(5, 2)]
    [[0, 1], [2, 3], [4]]
    """
    if per_batch is None:
        per_batch = count
    if isinstance(per_batch, bool) or not isinstance(per_batch, int) or per_batch < 1:
        raise ValueError(
            f"`thresholds_per_batch` must be a positive integer or None (all); got {per_batch!r}."
        )
    rows = np.arange(count, dtype=np.int64)
    return [rows[start : start + per_batch] for start in range(0, count, per_batch)]


@dataclasses.dataclass(frozen=True, repr=False)
class SweepCell:
    """What one call of :func:`sweep_cell` gives: ``k`` grid rows x ``b`` samples.

    Attributes
    ----------
    rows : int64 array of shape (k,)
        The grid rows (indices into the thresholds).
    indices : int64 array of shape (b,)
        The sample indices.
    losses : mapping of str to float64 arrays of shape (k, b)
    exits : int8 array of shape (k, b, T)
    images : float32 array of shape (k, b, C, H, W)
        The generated images in [0, 1].
    """

    rows: NDArray[np.int64]
    indices: NDArray[np.int64]
    losses: dict[str, NDArray[np.float64]]
    exits: NDArray[np.int8]
    images: NDArray[np.float32]

    def __repr__(self) -> str:
        return f"SweepCell(rows={self.rows.tolist()}, indices={self.indices.size})"


def sweep_cell(
    model: Denoiser,
    indices: ArrayLike,
    *,
    seed: int,
    thresholds: ArrayLike,
    rows: ArrayLike | None = None,
    reference: Tensor | None = None,
    earliest_exit: int = 1,
    losses: Mapping[str, LossFn],
    stream: int = 0,
) -> SweepCell:
    """Sample the given noise seeds under some rows of the grid in ONE call of :func:`sample`.

    The unit of work of :func:`sweep` (and of a distributed sweep): a cell is computed the
    same way wherever it runs, so the same cells give the same table bit for bit. The ``k``
    rows run as ``k * b`` rows of one early-exit sampler (row ``r * b + j``: sample ``j``
    under ``thresholds[rows[r]]``).

    Parameters
    ----------
    model : Denoiser
    indices : int array of shape (b,)
        Sample indices (noise seeds ``[seed, stream, i]``).
    seed, stream : int
    thresholds : array of shape (K,)
        The whole grid, ``thresholds[0] = inf``.
    rows : int array of shape (k,), optional
        Increasing grid rows to sample (default: all).
    reference : Tensor of shape (b, C, H, W), optional
        The full model's images in [0, 1] from the same noise (row 0 of another cell of the
        same samples); required when ``rows`` does not start with row 0, which then provides
        it.
    earliest_exit : int
    losses : mapping of name to callable
        ``fn(images, reference)`` -> (B,) losses, as in :func:`sweep`.

    Returns
    -------
    SweepCell
    """
    grid = np.asarray(thresholds, dtype=np.float64)  # (K,)
    picked = np.arange(grid.size) if rows is None else np.asarray(rows, dtype=np.int64)  # (k,)
    if (
        picked.ndim != 1
        or picked.size == 0
        or (picked < 0).any()
        or (picked >= grid.size).any()
        or (np.diff(picked) <= 0).any()
    ):
        raise ValueError(
            f"`rows` must be increasing grid rows in [0, {grid.size - 1}]; got {picked.tolist()}."
        )
    ids = np.asarray(indices, dtype=np.int64)  # (b,)
    config = model.config
    shape = config.image_shape
    k, b, steps = picked.size, ids.size, config.steps
    if picked[0] == 0:
        if reference is not None:
            raise ValueError("`reference` must be None when `rows` holds row 0 (the full model).")
    elif reference is None or tuple(reference.shape) != (b, *shape):
        got = None if reference is None else tuple(reference.shape)
        raise ValueError(
            f"`reference` must be the full model's images, shape {(b, *shape)}, when `rows` "
            f"does not hold row 0; got {got}."
        )
    noise = sample_noise(ids, seed=seed, steps=steps, image_shape=shape, stream=stream)
    batch = noise.repeat(k, 1, 1, 1, 1)  # (k*b, T, C, H, W): row r*b + j is sample j
    limits = torch.as_tensor(grid[picked])  # (k,)
    result = sample(
        model, batch, threshold=limits.repeat_interleave(b), earliest_exit=earliest_exit
    )
    pictures = to_unit(result.images).view(k, b, *shape)  # (k, b, C, H, W)
    full = pictures[:1] if reference is None else reference[None]  # (1, b, C, H, W)
    against = full.expand_as(pictures).reshape(k * b, *shape)  # (k*b, C, H, W)
    tables = {}
    for name, fn in losses.items():  # a loop over the few losses
        values = fn(pictures.reshape(k * b, *shape), against)  # (k*b,)
        tables[name] = values.view(k, b).double().numpy()
    return SweepCell(
        rows=picked,
        indices=ids,
        losses=tables,
        exits=result.exits.view(k, b, steps).numpy().astype(np.int8),
        images=pictures.numpy(),
    )


def check_loss_fns(losses: Mapping[str, LossFn] | None) -> Mapping[str, LossFn]:
    """The loss callables of a sweep: ``ssim`` by default; names from :data:`LOSSES`."""
    loss_fns: Mapping[str, LossFn] = {"ssim": ssim_loss} if losses is None else losses
    unknown = sorted(set(loss_fns) - set(LOSSES))
    if unknown or not loss_fns:
        raise ValueError(f"`losses` must name some of {LOSSES}; got {sorted(loss_fns)}.")
    return loss_fns


def sweep_from_cells(
    *,
    thresholds: NDArray[np.float64],
    losses: Mapping[str, NDArray[np.float64]],
    exits: NDArray[np.int8],
    images: NDArray[np.float32],
    flops: dict[str, Any],
    n_exits: int,
    seed: int,
    stream: int,
    earliest_exit: int,
    seconds: float,
) -> DiffusionSweep:
    """The :class:`DiffusionSweep` of complete (K, N) tables, after checking the losses.

    ``flops`` is :func:`exitguard.tasks.diffusion.model.exit_flops` of the model.
    """
    for name, table in losses.items():  # bounded losses, checked once
        if table.min() < 0.0 or table.max() > 1.0 or not np.all(table[0] == 0.0):
            raise ValueError(
                f"loss {name!r} must lie in [0, 1] and be 0 for the full model; got values in "
                f"[{table.min():g}, {table.max():g}], row 0 max {table[0].max():g}."
            )
    return DiffusionSweep(
        thresholds=thresholds,
        losses=dict(losses),
        cost=sample_costs(exits, thresholds, flops),
        exits=exits,
        images=images,
        indices=np.arange(exits.shape[1], dtype=np.int64),
        seed=seed,
        stream=stream,
        earliest_exit=earliest_exit,
        n_exits=n_exits,
        flops=flops,
        seconds=seconds,
    )


def sweep(
    model: Denoiser,
    *,
    n: int,
    seed: int,
    thresholds: ArrayLike,
    earliest_exit: int = 1,
    losses: Mapping[str, LossFn] | None = None,
    batch_size: int = 32,
    thresholds_per_batch: int | None = None,
    stream: int = 0,
    progress: bool = False,
) -> DiffusionSweep:
    """Sample noise seeds ``0..n-1`` under every threshold and tabulate losses and costs.

    Parameters
    ----------
    model : Denoiser
    n : int
        Number of samples N (noise seeds ``[seed, stream, i]``, ``i < n``).
    seed, stream : int
        The noise (see :func:`exitguard.tasks.diffusion.sample.sample_noise`).
    thresholds : array of shape (K,)
        Strictly decreasing; ``inf`` (the full model) is put in front when missing.
    earliest_exit : int
        No sample leaves before this exit.
    losses : mapping of name to callable, optional
        ``fn(images, reference)`` on images in [0, 1] (B, C, H, W) -> (B,) losses in [0, 1];
        names from :data:`~exitguard.tasks.diffusion.losses.LOSSES`. Default: ``ssim`` only.
    batch_size : int
        Noise seeds per call; each call samples ``K * batch_size`` rows.
    thresholds_per_batch : int, optional
        Grid rows per call (default: all K). The table is computed cell by cell
        (:func:`sweep_cell`: ``batch_size`` samples x ``thresholds_per_batch`` rows); a
        distributed sweep with the same cells gives the same table bit for bit.
    progress : bool
        Show a progress bar.

    Returns
    -------
    DiffusionSweep
    """
    import time

    from exitguard.risk.exits import as_threshold_grid

    grid = as_threshold_grid(thresholds)  # (K,)
    earliest_exit = model.check_earliest_exit(earliest_exit)
    check_int(n, "n")
    check_int(batch_size, "batch_size")
    groups = threshold_groups(grid.size, thresholds_per_batch)
    loss_fns = check_loss_fns(losses)
    config = model.config
    k, steps = grid.size, config.steps
    tables = {name: np.zeros((k, n)) for name in loss_fns}
    exits = np.zeros((k, n, steps), dtype=np.int8)
    images = np.zeros((k, n, *config.image_shape), dtype=np.float32)
    start_time = time.perf_counter()
    starts = range(0, n, batch_size)
    for start in progress_bar(starts, enabled=progress, desc=f"sweep of {k} thresholds"):
        ids = np.arange(start, min(n, start + batch_size))
        reference = None
        for rows in groups:  # a loop over the few groups of thresholds
            cell = sweep_cell(
                model,
                ids,
                seed=seed,
                thresholds=grid,
                rows=rows,
                reference=reference,
                earliest_exit=earliest_exit,
                losses=loss_fns,
                stream=stream,
            )
            if reference is None:
                reference = torch.from_numpy(cell.images[0])  # (b, C, H, W) the full model
            for name, table in cell.losses.items():  # a loop over the few losses
                tables[name][rows[:, None], ids[None, :]] = table
            exits[rows[:, None], ids[None, :]] = cell.exits
            images[rows[:, None], ids[None, :]] = cell.images
    return sweep_from_cells(
        thresholds=grid,
        losses=tables,
        exits=exits,
        images=images,
        flops=exit_flops(model, earliest_exit=earliest_exit),
        n_exits=model.n_exits,
        seed=seed,
        stream=stream,
        earliest_exit=earliest_exit,
        seconds=time.perf_counter() - start_time,
    )


def exit_counts(exits: ArrayLike, n_exits: int) -> list[int]:
    """Number of (sample, step) pairs that left at each exit; length ``n_exits``."""
    return np.bincount(np.asarray(exits, dtype=np.int64).ravel(), minlength=n_exits).tolist()
