"""Distributed collection of per-exit outputs and distributed diffusion sweeps.

Both compute exactly what the single-process code computes, item by item, so the merged
result equals it bit for bit (on workers with the same hardware and library versions):

- :func:`collect` splits the samples into blocks of whole batches (``block_size`` a multiple
  of ``batch_size``), so every batch is the one :func:`exitguard.nn.collect` runs;
- :func:`diffusion_sweep` computes the cells of :func:`exitguard.tasks.diffusion.sweep.sweep`
  (``batch_size`` samples x ``thresholds_per_batch`` grid rows) with the same per-sample noise
  (drawn from ``[seed, stream, sample id]``, whatever the batch); cells without the full
  model's row wait for the cell that has it and take its images as the loss reference.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

from exitguard.distributed.merge import merge_samples, merge_table, unique_sample_ids
from exitguard.distributed.models import ModelPayload, denoiser_payload
from exitguard.distributed.options import RunOptions
from exitguard.distributed.runner import Job, Worker, WorkItem, run_and_merge
from exitguard.distributed.shards import ShardStore
from exitguard.risk._validation import check_int

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typed **options (PEP 692; typing has it from 3.11)


def array_sha256(array: NDArray[Any] | None) -> str | None:
    """Hash of an array's dtype, shape and bytes (None for None)."""
    if array is None:
        return None
    data = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{data.dtype.str}{data.shape}".encode())
    digest.update(data.reshape(-1).view(np.uint8).data)
    return digest.hexdigest()


def restore_layout(array: NDArray[Any], strides: Sequence[int]) -> NDArray[Any]:
    """A writeable copy of ``array`` laid out with the byte ``strides`` of the block it was
    sent from (``array`` itself when it already is one).

    Ray (like pickle) delivers a read-only array with default C strides; the strides of the
    original matter, because torch chooses kernels by memory format (a (B, 1, H, W) batch
    whose channel stride is 1 counts as channels-last) and different kernels round
    differently. A dense original (every element once, in some axis order; size-1 axes with
    any stride) is rebuilt exactly; any other comes back with C strides.
    """
    shape, strides = array.shape, tuple(strides)
    if array.strides == strides and array.flags.writeable:
        return array
    big = [axis for axis in range(array.ndim) if shape[axis] > 1]
    order = sorted(big, key=lambda axis: -strides[axis])  # memory order, outermost first
    expected = array.itemsize
    for axis in reversed(order):  # a loop over the few axes: is the original dense?
        if len(strides) != array.ndim or strides[axis] != expected:
            return np.array(array, copy=True)
        expected *= shape[axis]
    rest = [axis for axis in range(array.ndim) if axis not in order]
    dense = np.array(array.transpose([*rest, *order]), order="C", copy=True)  # that order
    view = dense.transpose(np.argsort([*rest, *order]))  # back to the original axes
    # Only size-1 axes change their stride: no element is reachable twice.
    return np.lib.stride_tricks.as_strided(view, shape=shape, strides=strides, writeable=True)


def _block_bounds(n: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(n, start + size)) for start in range(0, n, size)]


def _block_width(count: int, least: int = 5) -> int:
    """Digits of item numbers (zero-padded, so that file names sort in order)."""
    return max(least, len(str(count - 1)))


def cell_items(
    blocks: Sequence[NDArray[np.int64]],
    groups: Sequence[NDArray[np.int64]],
    *,
    after_first_group: bool = False,
) -> list[WorkItem]:
    """The cells of a sweep as work items ``g{group}-b{block}``: every block of samples (ids)
    under every group of grid rows, block by block.

    With ``after_first_group``, a cell of a later group waits for the cell of group 0 of its
    block (the one with the full model's row, whose outputs are the loss reference).
    """
    width, gwidth = _block_width(len(blocks)), _block_width(len(groups), 2)
    items = []
    for block, samples in enumerate(blocks):  # a loop over blocks x groups: the items
        first = f"g{0:0{gwidth}d}-b{block:0{width}d}"
        for group, rows in enumerate(groups):
            after = first if after_first_group and group > 0 else None
            items.append(
                WorkItem(f"g{group:0{gwidth}d}-b{block:0{width}d}", samples, rows=rows, after=after)
            )
    return items


class CellJob(Job):
    """A sweep computed cell by cell: a block of samples x a group of rows of the grid (the
    work items, from :func:`cell_items`)."""

    grid: NDArray[np.float64]  # (K,)
    batch_size: int
    thresholds_per_batch: int | None
    _items: list[WorkItem]

    def items(self) -> list[WorkItem]:
        return list(self._items)

    def cell_description(self) -> dict[str, Any]:
        """What identifies the cells: the grid (exactly, in hex), their sizes, torch's version."""
        return {
            "thresholds": [float(t).hex() for t in self.grid],
            "batch_size": self.batch_size,
            "thresholds_per_batch": self.thresholds_per_batch,
            "torch": torch.__version__,
        }


# ------------------------------------------------------------------------- collection


class _CollectWorker(Worker):
    def __init__(self, model: ModelPayload, batch_size: int) -> None:
        self.model = model.light()
        self.batch_size = batch_size

    def setup(self, weights: Mapping[str, bytes]) -> None:
        self.network: Any = self.model.build(weights=weights["model"])

    def compute(
        self, item: WorkItem, inputs: Mapping[str, Any]
    ) -> tuple[dict[str, NDArray[Any]], dict[str, Any]]:
        from exitguard.nn.collect import collect as collect_outputs

        labels = inputs["labels"]
        data = restore_layout(inputs["data"], inputs["strides"])
        outputs = collect_outputs(
            self.network,
            torch.from_numpy(data),
            labels=None if labels is None else torch.from_numpy(labels),
            batch_size=self.batch_size,
        )
        arrays = {
            "logits": outputs.logits,
            "probs": outputs.probs,
            "confidences": outputs.confidences,
        }
        if outputs.labels is not None:
            arrays["labels"] = outputs.labels
        return arrays, {"measure": outputs.measure}


class CollectJob(Job):
    """Every exit's outputs on ``data``, in blocks of ``block_size`` samples.

    See :func:`collect` for the parameters.
    """

    def __init__(
        self,
        model: ModelPayload,
        data: ArrayLike,
        *,
        labels: ArrayLike | None = None,
        sample_ids: ArrayLike | None = None,
        batch_size: int = 256,
        block_size: int | None = None,
    ) -> None:
        if not isinstance(model, ModelPayload):
            raise TypeError(f"`model` must be a ModelPayload; got {type(model).__name__}.")
        self.model = model
        self.data = np.asarray(data.numpy() if isinstance(data, torch.Tensor) else data)
        n = self.data.shape[0] if self.data.ndim else 0
        if n == 0:
            raise ValueError(f"`data` must hold at least one sample; got shape {self.data.shape}.")
        self.labels = None
        if labels is not None:
            array = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
            if array.shape[:1] != (n,):
                raise ValueError(
                    f"`labels` must have one entry per sample ({n}); got shape {array.shape}."
                )
            self.labels = array
        ids = np.arange(n) if sample_ids is None else np.asarray(sample_ids)
        if ids.shape != (n,) or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"`sample_ids` must be ({n},) integers, one per sample; got shape {ids.shape} "
                f"and dtype {ids.dtype}."
            )
        self.sample_ids = unique_sample_ids(ids)
        self.batch_size = check_int(batch_size, "batch_size")
        size = block_size if block_size is not None else 4 * batch_size
        if check_int(size, "block_size") % batch_size:
            raise ValueError(
                f"`block_size` must be a multiple of `batch_size` ({batch_size}) so that every "
                f"batch is the single-process one; got {block_size!r}."
            )
        self.block_size = size
        bounds = _block_bounds(n, size)
        width = _block_width(len(bounds))
        self._items = [
            WorkItem(f"b{index:0{width}d}", self.sample_ids[start:stop])
            for index, (start, stop) in enumerate(bounds)
        ]
        self._bounds = {item.id: bound for item, bound in zip(self._items, bounds, strict=True)}

    def description(self) -> dict[str, Any]:
        return {
            "kind": "collect",
            "model": self.model.describe(),
            "data_sha256": array_sha256(self.data),
            "data_strides": list(self.data.strides),  # the layout picks the kernels
            "labels_sha256": array_sha256(self.labels),
            "sample_ids_sha256": array_sha256(self.sample_ids),
            "n": int(self.sample_ids.size),
            "batch_size": self.batch_size,
            "block_size": self.block_size,
        }

    def items(self) -> list[WorkItem]:
        return list(self._items)

    def inputs(self, item: WorkItem, store: ShardStore) -> dict[str, Any]:
        start, stop = self._bounds[item.id]
        labels = None if self.labels is None else self.labels[start:stop]
        block = self.data[start:stop]
        return {"data": block, "strides": block.strides, "labels": labels}

    def worker(self) -> Worker:
        return _CollectWorker(self.model, self.batch_size)

    def weights(self) -> dict[str, bytes]:
        return {"model": self.model.weights}

    def merge(self, store: ShardStore, *, seconds: float) -> Any:
        from exitguard.nn.collect import ExitOutputs

        shards = store.shards()
        measures = {shard.meta.get("measure") for shard in shards}
        if len(measures) != 1:
            raise ValueError(f"the shards disagree on the confidence measure: {measures}.")
        merged = merge_samples(shards, sample_ids=self.sample_ids)
        return ExitOutputs(
            logits=merged["logits"],
            probs=merged["probs"],
            confidences=merged["confidences"],
            labels=merged.get("labels"),
            measure=str(measures.pop()),
        )


def collect(
    model: ModelPayload,
    data: ArrayLike,
    *,
    labels: ArrayLike | None = None,
    sample_ids: ArrayLike | None = None,
    batch_size: int = 256,
    block_size: int | None = None,
    **options: Unpack[RunOptions],
) -> Any:
    """:func:`exitguard.nn.collect` on a Ray cluster: every exit's outputs, merged by sample id.

    Parameters
    ----------
    model : ModelPayload
        The network (an :class:`~exitguard.nn.EarlyExitNetwork`) as weights and factory,
        e.g. :func:`exitguard.distributed.models.classifier_payload`.
    data : array of shape (n, ...)
        The samples; each work item sends its block to a worker.
    labels : array of shape (n,), optional
    sample_ids : int array of shape (n,), optional
        Unique ids of the samples (default ``0..n-1``); shards carry them.
    batch_size : int
        As in :func:`exitguard.nn.collect`.
    block_size : int, optional
        Samples per work item, a multiple of ``batch_size`` (default ``4 * batch_size``).
    **options : RunOptions
        ``address``, ``workers``, ``threads``, ``shards``, ``retries``, ``progress`` and
        ``log``: see :func:`exitguard.distributed.run`.

    Returns
    -------
    ExitOutputs
        Equal, array for array and bit for bit, to ``exitguard.nn.collect(network, data,
        labels=labels, batch_size=batch_size)`` on the same hardware.

    Raises
    ------
    IncompleteRunError
        When blocks fail after Ray's retries (the finished ones stay in the shard folder).
    """
    job = CollectJob(
        model,
        data,
        labels=labels,
        sample_ids=sample_ids,
        batch_size=batch_size,
        block_size=block_size,
    )
    return run_and_merge(job, **options)


# ---------------------------------------------------------------------- diffusion sweep


class _DiffusionWorker(Worker):
    def __init__(
        self,
        model: ModelPayload,
        features: ModelPayload | None,
        *,
        losses: Sequence[str],
        seed: int,
        stream: int,
        thresholds: NDArray[np.float64],
        earliest_exit: int,
    ) -> None:
        self.model = model.light()
        self.features = None if features is None else features.light()
        self.losses = tuple(losses)
        self.seed, self.stream = seed, stream
        self.thresholds = thresholds
        self.earliest_exit = earliest_exit

    def setup(self, weights: Mapping[str, bytes]) -> None:
        from exitguard.tasks.diffusion.losses import FeatureDistance, ssim_loss

        self.denoiser: Any = self.model.build(weights=weights["model"])
        self.loss_fns: dict[str, Any] = {}
        for name in self.losses:  # a loop over the few losses
            if name == "ssim":
                self.loss_fns[name] = ssim_loss
            elif self.features is not None:  # the job checked that it is given
                self.loss_fns[name] = FeatureDistance(
                    self.features.build(weights=weights["features"])
                )

    def compute(
        self, item: WorkItem, inputs: Mapping[str, Any]
    ) -> tuple[dict[str, NDArray[Any]], dict[str, Any]]:
        from exitguard.tasks.diffusion.sweep import sweep_cell

        reference = inputs.get("reference")
        cell = sweep_cell(
            self.denoiser,
            item.sample_ids,
            seed=self.seed,
            thresholds=self.thresholds,
            rows=item.rows,
            reference=None if reference is None else torch.from_numpy(reference),
            earliest_exit=self.earliest_exit,
            losses=self.loss_fns,
            stream=self.stream,
        )
        arrays: dict[str, NDArray[Any]] = {f"loss_{k}": v for k, v in cell.losses.items()}
        arrays["exits"] = cell.exits
        arrays["images"] = cell.images
        return arrays, {}


class DiffusionSweepJob(CellJob):
    """The cells of a diffusion sweep; see :func:`diffusion_sweep` for the parameters."""

    def __init__(
        self,
        model: Any,
        *,
        n: int,
        seed: int,
        thresholds: ArrayLike,
        earliest_exit: int = 1,
        losses: Sequence[str] = ("ssim",),
        features: ModelPayload | None = None,
        batch_size: int = 32,
        thresholds_per_batch: int | None = None,
        stream: int = 0,
    ) -> None:
        from exitguard.risk.exits import as_threshold_grid
        from exitguard.tasks.diffusion.losses import LOSSES
        from exitguard.tasks.diffusion.model import Denoiser, exit_flops
        from exitguard.tasks.diffusion.sample import _check_seed
        from exitguard.tasks.diffusion.sweep import threshold_groups

        if isinstance(model, ModelPayload):
            self.payload, denoiser = model, model.build()
        elif isinstance(model, Denoiser):
            self.payload, denoiser = denoiser_payload(model), model
        else:
            raise TypeError(
                f"`model` must be a Denoiser or a ModelPayload; got {type(model).__name__}."
            )
        if not isinstance(denoiser, Denoiser):
            raise TypeError(f"`model` must build a Denoiser; got {type(denoiser).__name__}.")
        self.grid = as_threshold_grid(thresholds)  # (K,)
        self.earliest_exit = denoiser.check_earliest_exit(earliest_exit)
        self.n = check_int(n, "n")
        self.seed, self.stream = _check_seed(seed), _check_seed(stream, "stream")
        names = tuple(losses)
        if not names or sorted(set(names) - set(LOSSES)) or len(set(names)) != len(names):
            raise ValueError(f"`losses` must name some of {LOSSES} once each; got {names!r}.")
        if ("features" in names) != (features is not None):
            raise ValueError(
                "`features` (the classifier's ModelPayload) must be given exactly when "
                f"`losses` holds 'features'; got losses {names!r} and features={features!r}."
            )
        self.losses, self.features = names, features
        self.batch_size = check_int(batch_size, "batch_size")
        self.groups = threshold_groups(self.grid.size, thresholds_per_batch)
        self.thresholds_per_batch = thresholds_per_batch
        self.flops = exit_flops(denoiser, earliest_exit=self.earliest_exit)
        self.n_exits = denoiser.n_exits
        self.steps = denoiser.config.steps
        self.image_shape = denoiser.config.image_shape
        blocks = [np.arange(start, stop) for start, stop in _block_bounds(self.n, self.batch_size)]
        self._items = cell_items(blocks, self.groups, after_first_group=True)

    def description(self) -> dict[str, Any]:
        return {
            "kind": "diffusion-sweep",
            "model": self.payload.describe(),
            "features": None if self.features is None else self.features.describe(),
            "losses": list(self.losses),
            "n": self.n,
            "seed": self.seed,
            "stream": self.stream,
            "earliest_exit": self.earliest_exit,
            **self.cell_description(),
        }

    def inputs(self, item: WorkItem, store: ShardStore) -> dict[str, Any]:
        if item.after is None:
            return {}
        return {"reference": store.read(item.after).arrays["images"][0]}  # (b, C, H, W)

    def worker(self) -> Worker:
        return _DiffusionWorker(
            self.payload,
            self.features,
            losses=self.losses,
            seed=self.seed,
            stream=self.stream,
            thresholds=self.grid,
            earliest_exit=self.earliest_exit,
        )

    def weights(self) -> dict[str, bytes]:
        found = {"model": self.payload.weights}
        if self.features is not None:
            found["features"] = self.features.weights
        return found

    def merge(self, store: ShardStore, *, seconds: float) -> Any:
        from exitguard.tasks.diffusion.sweep import sweep_from_cells

        merged = merge_table(store.shards(), sample_ids=np.arange(self.n), n_rows=self.grid.size)
        return sweep_from_cells(
            thresholds=self.grid,
            losses={name: merged[f"loss_{name}"] for name in self.losses},
            exits=merged["exits"],
            images=merged["images"],
            flops=self.flops,
            n_exits=self.n_exits,
            seed=self.seed,
            stream=self.stream,
            earliest_exit=self.earliest_exit,
            seconds=seconds,
        )


def diffusion_sweep(
    model: Any,
    *,
    n: int,
    seed: int,
    thresholds: ArrayLike,
    earliest_exit: int = 1,
    losses: Sequence[str] = ("ssim",),
    features: ModelPayload | None = None,
    batch_size: int = 32,
    thresholds_per_batch: int | None = None,
    stream: int = 0,
    **options: Unpack[RunOptions],
) -> Any:
    """:func:`exitguard.tasks.diffusion.sweep.sweep` on a Ray cluster.

    Work items are cells: ``batch_size`` noise seeds x ``thresholds_per_batch`` grid rows
    (default all K), the cells of the single-process sweep with the same arguments.

    Parameters
    ----------
    model : Denoiser or ModelPayload
    n, seed, thresholds, earliest_exit, batch_size, thresholds_per_batch, stream
        As in :func:`exitguard.tasks.diffusion.sweep.sweep`.
    losses : sequence of {"ssim", "features"}
        Loss names (callables cannot travel; the workers build them).
    features : ModelPayload, optional
        The classifier of the ``features`` loss
        (:class:`~exitguard.tasks.diffusion.losses.FeatureDistance`).
    **options : RunOptions
        ``address``, ``workers``, ``threads``, ``shards``, ``retries``, ``progress`` and
        ``log``: see :func:`exitguard.distributed.run`.

    Returns
    -------
    DiffusionSweep
        Equal, bit for bit, to the single-process sweep with the same arguments on the same
        hardware (``seconds`` is this run's wall time).
    """
    job = DiffusionSweepJob(
        model,
        n=n,
        seed=seed,
        thresholds=thresholds,
        earliest_exit=earliest_exit,
        losses=losses,
        features=features,
        batch_size=batch_size,
        thresholds_per_batch=thresholds_per_batch,
        stream=stream,
    )
    return run_and_merge(job, **options)
