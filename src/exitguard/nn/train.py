"""Training the exits: heads only on a frozen backbone, or everything jointly.

Loss of a batch: ``sum_l w_l * (CE_l + distill * KD_l) / sum_l w_l``, where ``CE_l`` is the
cross-entropy of exit ``l`` and ``KD_l`` the self-distillation term
``T^2 * KL(softmax(z_last / T) || softmax(z_l / T))`` towards the (detached) last exit, for
every exit but the last.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import Tensor

from exitguard.nn._data import batch_count, iter_batches, model_device
from exitguard.nn._modes import kept_modes
from exitguard.nn.network import EarlyExitNetwork
from exitguard.risk._validation import check_int

Mode = Literal["heads", "joint"]


def _tqdm() -> Callable[..., Any]:
    try:
        from tqdm import tqdm
    except ImportError as error:  # pragma: no cover - tqdm ships with the torch extra
        raise ImportError('progress bars need tqdm: pip install "exitguard[torch]"') from error
    return tqdm  # type: ignore[no-any-return]


def _number(value: Any, name: str, *, low: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"`{name}` must be a finite number; got {value!r}.")
    if value < low or (low_open and value == low):
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        raise ValueError(f"`{name}` must be {bound}; got {value!r}.")
    return float(value)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How :func:`train_exits` trains.

    Attributes
    ----------
    mode : {"heads", "joint"}, default "heads"
        ``"heads"``: train the exit heads only; the stages are frozen, in eval mode (their
        BatchNorm statistics do not move) and run without gradients. ``"joint"``: train
        stages and heads together.
    epochs : int, default 1
    batch_size : int, default 64
        Batch size when the data is a tensor (a DataLoader brings its own).
    lr, weight_decay : float
        AdamW settings.
    lr_schedule : {"constant", "cosine"}, default "constant"
        ``"cosine"``: the learning rate of epoch ``e`` (0-based) is
        ``lr * (1 + cos(pi * e / epochs)) / 2`` (cosine annealing, one step per epoch).
    loss_weights : tuple of float, optional
        Weight of each exit's loss (length L, non-negative, not all zero); equal by default.
    distill : float, default 0.0
        Weight of self-distillation from the last exit (0 = none).
    temperature : float, default 1.0
        Softmax temperature of the distillation term.
    ignore_index : int, default -100
        Label value that is ignored (e.g. unlabelled pixels).
    seed : int, default 0
        Seeds shuffling, dropout and head initialisation order; the global random state is
        left as it was.
    """

    mode: Mode = "heads"
    epochs: int = 1
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    loss_weights: tuple[float, ...] | None = None
    distill: float = 0.0
    temperature: float = 1.0
    ignore_index: int = -100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("heads", "joint"):
            raise ValueError(f"`mode` must be 'heads' or 'joint'; got {self.mode!r}.")
        check_int(self.epochs, "epochs", minimum=1)
        check_int(self.batch_size, "batch_size", minimum=1)
        _number(self.lr, "lr", low=0.0, low_open=True)
        _number(self.weight_decay, "weight_decay", low=0.0)
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(
                f"`lr_schedule` must be 'constant' or 'cosine'; got {self.lr_schedule!r}."
            )
        _number(self.distill, "distill", low=0.0)
        _number(self.temperature, "temperature", low=0.0, low_open=True)
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"`ignore_index` must be an integer; got {self.ignore_index!r}.")
        check_int(self.seed, "seed", minimum=0)
        if self.loss_weights is not None:
            weights = tuple(_number(w, "loss_weights[]", low=0.0) for w in self.loss_weights)
            if not weights or sum(weights) == 0:
                raise ValueError(
                    f"`loss_weights` must hold one non-negative weight per exit, not all zero; "
                    f"got {self.loss_weights!r}."
                )
            object.__setattr__(self, "loss_weights", weights)


@dataclasses.dataclass(frozen=True, repr=False)
class TrainHistory:
    """What :func:`train_exits` saw, per epoch.

    Attributes
    ----------
    config : TrainConfig
    loss : array of shape (epochs,)
        Mean training loss (the weighted objective).
    exit_loss : array of shape (epochs, L)
        Mean cross-entropy of each exit.
    exit_accuracy : array of shape (epochs, L)
        Training accuracy of each exit.
    """

    config: TrainConfig
    loss: NDArray[np.float64]
    exit_loss: NDArray[np.float64]
    exit_accuracy: NDArray[np.float64]

    def __repr__(self) -> str:
        accuracy = ", ".join(f"{a:.3f}" for a in self.exit_accuracy[-1])
        return (
            f"TrainHistory(mode={self.config.mode!r}, epochs={len(self.loss)}, "
            f"final_loss={self.loss[-1]:.4f}, final_exit_accuracy=[{accuracy}])"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.config),
            "loss": self.loss.tolist(),
            "exit_loss": self.exit_loss.tolist(),
            "exit_accuracy": self.exit_accuracy.tolist(),
        }


def exit_losses(
    logits: Tensor,
    labels: Tensor,
    *,
    weights: Tensor,
    distill: float = 0.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor]:
    """The training objective and each exit's cross-entropy.

    Parameters
    ----------
    logits : Tensor of shape (B, L, C) or (B, L, C, *S)
    labels : Tensor of shape (B,) or (B, *S)
    weights : Tensor of shape (L,)

    Returns
    -------
    loss : Tensor, scalar
    cross_entropy : Tensor of shape (L,), detached
    """
    n_exits = logits.shape[1]
    ce = torch.stack(
        [F.cross_entropy(logits[:, e], labels, ignore_index=ignore_index) for e in range(n_exits)]
    )  # (L,)
    per_exit = ce
    if distill > 0 and n_exits > 1:
        teacher = F.log_softmax(logits[:, -1].detach() / temperature, dim=1)  # (B, C, ...)
        kd = []
        for e in range(n_exits - 1):  # a loop over the (few) exits
            student = F.log_softmax(logits[:, e] / temperature, dim=1)  # (B, C, ...)
            kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(dim=1)
            kd.append(kl.mean() * temperature**2)
        kd.append(ce.new_zeros(()))  # the last exit is the teacher
        per_exit = ce + distill * torch.stack(kd)  # (L,)
    loss = (weights * per_exit).sum() / weights.sum()
    return loss, ce.detach()


def _exit_logits(network: EarlyExitNetwork, x: Tensor, *, heads_only: bool) -> Tensor:
    """(B, ...) -> (B, L, C, ...); with ``heads_only`` the stages run without gradients."""
    if not heads_only:
        return network(x)  # type: ignore[no-any-return]
    with torch.no_grad():
        features = network.forward_intermediates(x)
    outputs = [head(f) for head, f in zip(network.heads, features, strict=True)]
    return torch.stack(outputs, dim=1)  # (B, L, C, ...)


def train_exits(
    network: EarlyExitNetwork,
    data: Any,
    *,
    labels: Any = None,
    config: TrainConfig | None = None,
    progress: bool = True,
) -> TrainHistory:
    """Train the exit heads (and, in joint mode, the backbone).

    Parameters
    ----------
    network : EarlyExitNetwork
        Trained in place, on its own device.
    data : Tensor or numpy array of shape (n, ...), or iterable of (x, y) batches
        Training samples (with ``labels``), or batches such as a DataLoader gives. A numpy
        array becomes a tensor (floats in torch's default dtype, float32 unless changed).
    labels : array-like of shape (n,) or (n, *S), optional
        Labels of a tensor ``data``.
    config : TrainConfig, optional
        Defaults to ``TrainConfig()``: heads only, one epoch.
    progress : bool, default True
        Show a progress bar per epoch: batches done of the total, time left, and the mean
        loss of the epoch so far.

    Returns
    -------
    TrainHistory

    Notes
    -----
    Reproducible: the same seed, data and network give the same weights. Shuffling uses
    a generator seeded with ``config.seed``; dropout uses the global generator, seeded
    inside a fork so that the caller's random state is restored afterwards. Each module's
    train/eval mode is restored at the end.
    """
    if not isinstance(network, EarlyExitNetwork):
        raise TypeError(f"`network` must be an EarlyExitNetwork; got {type(network).__name__}.")
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise TypeError(f"`config` must be a TrainConfig; got {type(config).__name__}.")
    n_exits = network.n_exits
    if config.loss_weights is not None and len(config.loss_weights) != n_exits:
        raise ValueError(
            f"`loss_weights` must have one weight per exit ({n_exits}); got "
            f"{len(config.loss_weights)}."
        )
    if isinstance(data, Iterator) and config.epochs > 1:
        raise TypeError(
            "`data` is a one-shot iterator but `epochs` > 1; pass a DataLoader or a tensor."
        )
    device = model_device(network)
    heads_only = config.mode == "heads"
    parameters = network.heads.parameters() if heads_only else network.parameters()
    trainable = [p for p in parameters if p.requires_grad]
    if not trainable:
        raise ValueError(
            f"nothing to train in mode {config.mode!r}: the "
            f"{'heads have' if heads_only else 'network has'} no parameters that require grad."
        )
    weights = torch.tensor(config.loss_weights or [1.0] * n_exits, device=device)
    cuda = [device.index or 0] if device.type == "cuda" else []
    history: dict[str, list[Any]] = {"loss": [], "exit_loss": [], "exit_accuracy": []}
    with torch.random.fork_rng(devices=cuda), kept_modes(network):
        torch.manual_seed(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
        schedule = (
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
            if config.lr_schedule == "cosine"
            else None
        )
        network.train()
        if heads_only:
            network.stages.eval()  # frozen: no BatchNorm statistics updates, no dropout
        for epoch in range(config.epochs):
            batches = iter_batches(
                data, labels=labels, batch_size=config.batch_size, generator=generator
            )
            bar = _tqdm()(
                batches,
                desc=f"epoch {epoch + 1}/{config.epochs}",
                total=batch_count(data, batch_size=config.batch_size),
                unit="batch",
                disable=not progress,
            )
            totals = np.zeros(1 + 2 * n_exits)  # loss, CE per exit, correct per exit
            seen = counted = 0
            for x, y in bar:
                if y is None:
                    raise ValueError("training needs labels: `data` gave a batch without them.")
                x, y = x.to(device), y.to(device)
                logits = _exit_logits(network, x, heads_only=heads_only)  # (B, L, C, ...)
                loss, ce = exit_losses(
                    logits,
                    y,
                    weights=weights,
                    distill=config.distill,
                    temperature=config.temperature,
                    ignore_index=config.ignore_index,
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    valid = y != config.ignore_index  # (B, ...)
                    hits = (logits.argmax(dim=2) == y.unsqueeze(1)) & valid.unsqueeze(1)
                    correct = hits.reshape(*hits.shape[:2], -1).sum(dim=(0, 2))  # (L,)
                batch, value = x.shape[0], float(loss.detach())
                totals[0] += value * batch
                totals[1 : 1 + n_exits] += ce.cpu().numpy() * batch
                totals[1 + n_exits :] += correct.cpu().numpy()
                seen += batch
                counted += int(valid.sum())
                bar.set_postfix(mean_loss=f"{totals[0] / seen:.4f}", refresh=False)
            if seen == 0:
                raise ValueError("`data` gave no batches.")
            history["loss"].append(totals[0] / seen)
            history["exit_loss"].append(totals[1 : 1 + n_exits] / seen)
            history["exit_accuracy"].append(totals[1 + n_exits :] / max(counted, 1))
            if schedule is not None:
                schedule.step()
    return TrainHistory(
        config=config,
        loss=np.asarray(history["loss"], dtype=np.float64),
        exit_loss=np.asarray(history["exit_loss"], dtype=np.float64),
        exit_accuracy=np.asarray(history["exit_accuracy"], dtype=np.float64),
    )
