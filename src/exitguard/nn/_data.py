"""Batches from the forms of data that `train_exits` and `collect` accept."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn


def model_device(network: nn.Module) -> torch.device:
    reference = next(iter(network.parameters()), None)
    return reference.device if reference is not None else torch.device("cpu")


def as_label_tensor(labels: Any, n: int) -> Tensor:
    tensor = torch.as_tensor(np.asarray(labels) if not isinstance(labels, Tensor) else labels)
    if tensor.shape[:1] != (n,):
        raise ValueError(
            f"`labels` must have one entry per sample ({n}) along the first axis; got shape "
            f"{tuple(tensor.shape)}."
        )
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"`labels` must hold integer class indices; got dtype {tensor.dtype}.")
    return tensor.long()


def as_samples(data: Any) -> Any:
    """``data`` with a numpy array of samples turned into a tensor (floats in torch's default
    dtype, usually float32, as the weights are); anything else as given."""
    if not isinstance(data, np.ndarray):
        return data
    if data.dtype.kind not in "fiub":
        raise TypeError(
            f"`data` must hold numbers; got a numpy array of dtype {data.dtype}. Pass a tensor "
            "of samples (e.g. torch.from_numpy(images)) or a DataLoader."
        )
    tensor = torch.from_numpy(np.ascontiguousarray(data))
    return tensor.to(torch.get_default_dtype()) if tensor.is_floating_point() else tensor


def batch_count(data: Any, *, batch_size: int) -> int | None:
    """How many batches :func:`iter_batches` will give, when known (for progress bars)."""
    if isinstance(data, (Tensor, np.ndarray)):
        return -(-int(data.shape[0]) // batch_size) if data.ndim else None
    try:
        return len(data)
    except TypeError:  # an iterator or a generator: unknown
        return None


def iter_batches(
    data: Any,
    *,
    labels: Any,
    batch_size: int,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Yield ``(x, y)`` batches (``y`` may be None).

    ``data`` is either a tensor (or numpy array, see :func:`as_samples`) of samples (batched
    here, shuffled when ``generator`` is given, with ``labels`` alongside) or an iterable of
    batches, each a tensor or a ``(x, y, ...)`` sequence such as a DataLoader gives.
    """
    data = as_samples(data)
    if isinstance(data, Tensor):
        n = data.shape[0] if data.ndim else 0
        if n == 0:
            raise ValueError(
                f"`data` must hold at least one sample; got shape {tuple(data.shape)}."
            )
        targets = None if labels is None else as_label_tensor(labels, n)
        order = torch.randperm(n, generator=generator) if generator is not None else None
        for start in range(0, n, batch_size):
            stop = start + batch_size
            index = slice(start, stop) if order is None else order[start:stop]
            yield data[index], None if targets is None else targets[index]
        return
    if labels is not None:
        raise ValueError(
            "`labels` is only for a tensor `data`; an iterable of batches carries its own labels "
            "as (x, y) pairs."
        )
    if not isinstance(data, Iterable) or isinstance(data, (str, bytes)):
        raise TypeError(
            "`data` must be a tensor of samples or an iterable of batches (a tensor or an "
            f"(x, y) pair each, e.g. a DataLoader); got {type(data).__name__}."
        )
    for batch in data:
        if isinstance(batch, Tensor):
            yield batch, None
        elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
            y = batch[1] if len(batch) > 1 else None
            yield batch[0], None if y is None else as_label_tensor(y, batch[0].shape[0])
        else:
            raise TypeError(
                "each batch of `data` must be a tensor or an (x, y) pair of tensors; got "
                f"{type(batch).__name__}."
            )
