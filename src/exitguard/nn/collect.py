"""Collect every exit's outputs on a data set, as numpy arrays for the risk core."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from exitguard._files import atomic_write
from exitguard.nn._data import batch_count, iter_batches, model_device
from exitguard.nn._modes import eval_mode
from exitguard.nn.network import EarlyExitNetwork
from exitguard.risk._validation import check_int


@dataclasses.dataclass(frozen=True, repr=False)
class ExitOutputs:
    """Every exit's outputs on ``n`` samples.

    Attributes
    ----------
    logits : array of shape (n, L, C) or (n, L, C, *S)
        Exit logits, in the network's dtype.
    probs : float64 array, same shape
        Softmax over classes, computed in the network's dtype (exactly the probabilities
        :meth:`EarlyExitNetwork.infer` uses) and stored as float64.
    confidences : float64 array of shape (n, L)
        The network's confidence measure at every exit, as ``infer`` computes it.
    labels : int64 array of shape (n,) or (n, *S), or None
    measure : str
        Name of the confidence measure.
    """

    logits: NDArray[Any]
    probs: NDArray[np.float64]
    confidences: NDArray[np.float64]
    labels: NDArray[np.int64] | None
    measure: str

    @property
    def n(self) -> int:
        return int(self.logits.shape[0])

    @property
    def n_exits(self) -> int:
        return int(self.logits.shape[1])

    def __repr__(self) -> str:
        labels = "None" if self.labels is None else f"{self.labels.shape}"
        return (
            f"ExitOutputs(n={self.n}, n_exits={self.n_exits}, logits={self.logits.shape}, "
            f"labels={labels}, measure={self.measure!r})"
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the arrays to a ``.npz`` file (no pickle)."""
        target = Path(path)
        arrays = {
            "logits": self.logits,
            "probs": self.probs,
            "confidences": self.confidences,
            "measure": np.array(self.measure),
        }
        if self.labels is not None:
            arrays["labels"] = self.labels
        return atomic_write(
            target, lambda handle: np.savez_compressed(handle, **arrays), argument="path"
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ExitOutputs:
        """Read a file written by :meth:`save`."""
        with np.load(Path(path), allow_pickle=False) as data:
            missing = {"logits", "probs", "confidences", "measure"} - set(data.files)
            if missing:
                raise ValueError(f"{path} is not an ExitOutputs file: missing {sorted(missing)}.")
            return cls(
                logits=data["logits"],
                probs=data["probs"],
                confidences=data["confidences"],
                labels=data["labels"] if "labels" in data.files else None,
                measure=str(data["measure"]),
            )


def collect(
    network: EarlyExitNetwork,
    data: Any,
    *,
    labels: Any = None,
    batch_size: int = 256,
    progress: bool = False,
) -> ExitOutputs:
    """Run the network on ``data`` in eval mode and keep every exit's outputs.

    Parameters
    ----------
    network : EarlyExitNetwork
    data : Tensor or numpy array of shape (n, ...), or iterable of batches
        Samples, or batches (a tensor or an ``(x, y)`` pair each, e.g. a DataLoader).
    labels : array-like of shape (n,), optional
        Labels for a tensor ``data``.
    batch_size : int, default 256
        Batch size for a tensor ``data``.
    progress : bool, default False
        Show a progress bar.

    Returns
    -------
    ExitOutputs
        ``probs`` and ``labels`` are what ``exitguard.calibrate`` takes.
    """
    if not isinstance(network, EarlyExitNetwork):
        raise TypeError(f"`network` must be an EarlyExitNetwork; got {type(network).__name__}.")
    check_int(batch_size, "batch_size")
    device = model_device(network)
    batches = iter_batches(data, labels=labels, batch_size=batch_size)
    if progress:
        from exitguard.nn.train import _tqdm

        total = batch_count(data, batch_size=batch_size)
        batches = _tqdm()(batches, desc="collect", total=total, unit="batch")
    logits, probs, confidences, targets = [], [], [], []
    with eval_mode(network):
        for x, y in batches:
            batch_logits, batch_conf = network.exit_confidences(x.to(device))  # (B, L, C, ...)
            logits.append(batch_logits.cpu())
            probs.append(batch_logits.softmax(dim=2).double().cpu())
            confidences.append(batch_conf.cpu())
            targets.append(y)
    if not logits:
        raise ValueError("`data` gave no batches.")
    if any(t is None for t in targets) and not all(t is None for t in targets):
        raise ValueError("either every batch of `data` must carry labels or none.")
    labelled = [t for t in targets if t is not None]
    all_logits = torch.cat(logits)  # (n, L, C, ...)
    if all_logits.dtype == torch.bfloat16:  # numpy has no bfloat16
        all_logits = all_logits.float()
    return ExitOutputs(
        logits=all_logits.numpy(),
        probs=torch.cat(probs).numpy(),
        confidences=torch.cat(confidences).numpy(),
        labels=None if not labelled else torch.cat(labelled).numpy().astype(np.int64),
        measure=network.confidence,
    )
