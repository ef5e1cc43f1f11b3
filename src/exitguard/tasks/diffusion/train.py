"""Training the early-exit denoiser with DeeDiff's losses, and caching it.

Loss of a batch (``eps`` the true noise, ``g_i`` the noise prediction of intermediate exit
``i``, ``u_i`` its UEM's uncertainty, ``H = L - 1`` intermediate exits):

    MSE(eps_final, eps)
    + H * mean_i MSE(u_i, tanh|g_i - eps|.detach())             (the UEM learns the error)
    + H * mean_i mean((1 - u_i).detach() * (g_i - eps)^2)        (uncertainty-aware exit loss)

``H * mean_i`` is the sum over the intermediate exits, which is how DeeDiff's training script
adds them up: every exit's terms get the weight of the final output's term. Averaging over
the exits instead (dropping the factor ``H``) would shrink each exit's gradient as exits are
added, and shallow exits, whose errors the UEMs must learn to predict, would train too little.
The final exit has no UEM (a sample that reaches it always stops there), so it has only the
plain MSE.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from exitguard.tasks.common import CachedModel, DataKey, ModelCache, progress_bar
from exitguard.tasks.diffusion.model import Denoiser, DenoiserConfig
from exitguard.tasks.diffusion.sample import Schedule

CACHE_FORMAT = "exitguard.denoiser/1"
MODELS = ModelCache("denoiser", CACHE_FORMAT)  # cache entries "denoiser-<dataset>-<key>"


@dataclasses.dataclass(frozen=True)
class DeeDiffLoss:
    """The three terms of DeeDiff's loss (scalars) and their sum ``total``."""

    total: Tensor
    noise: Tensor
    uncertainty: Tensor
    weighted: Tensor


def deediff_loss(eps: Tensor, uncertainty: Tensor, noise: Tensor) -> DeeDiffLoss:
    """DeeDiff's training loss (see the module docstring).

    Parameters
    ----------
    eps : Tensor of shape (B, L, C, H, W)
        Every exit's noise prediction; ``eps[:, -1]`` is the final output.
    uncertainty : Tensor of shape (B, L - 1, C, H, W)
        Every intermediate exit's per-pixel uncertainty in (0, 1).
    noise : Tensor of shape (B, C, H, W)
        The true noise.
    """
    if eps.ndim != 5 or tuple(uncertainty.shape) != (
        eps.shape[0],
        eps.shape[1] - 1,
        *eps.shape[2:],
    ):
        raise ValueError(
            "`eps` must be (B, L, C, H, W) and `uncertainty` (B, L - 1, C, H, W); got "
            f"{tuple(eps.shape)} and {tuple(uncertainty.shape)}."
        )
    if tuple(noise.shape) != (eps.shape[0], *eps.shape[2:]):
        raise ValueError(
            f"`noise` must have shape {(eps.shape[0], *eps.shape[2:])}; got {tuple(noise.shape)}."
        )
    n_heads = uncertainty.shape[1]
    final = (eps[:, -1] - noise).pow(2).mean()
    error = eps[:, :-1] - noise[:, None]  # (B, H, C, H, W)
    target = torch.tanh(error.abs()).detach()  # (B, H, C, H, W)
    uem = n_heads * (uncertainty - target).pow(2).mean()
    weighted = n_heads * ((1.0 - uncertainty).detach() * error.pow(2)).mean()
    return DeeDiffLoss(final + uem + weighted, final, uem, weighted)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings of :func:`train_denoiser`.

    AdamW with a linear warm-up and a cosine decay; the weights kept are an exponential
    moving average (``ema``) of the iterates, the usual practice for diffusion models.
    """

    iterations: int = 4000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup: int = 200
    ema: float = 0.999
    log_every: int = 100
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrainHistory:
    """Mean loss terms over each window of ``log_every`` iterations (float64, (W,) each)."""

    iteration: NDArray[np.int64]
    total: NDArray[np.float64]
    noise: NDArray[np.float64]
    uncertainty: NDArray[np.float64]
    weighted: NDArray[np.float64]

    def to_dict(self) -> dict[str, list[float]]:
        return {f.name: getattr(self, f.name).tolist() for f in dataclasses.fields(self)}


def train_denoiser(
    model: Denoiser,
    images: Tensor,
    *,
    settings: TrainSettings,
    progress: bool = False,
) -> TrainHistory:
    """Train ``model`` in place on ``images`` (N, C, H, W) in [-1, 1] with DeeDiff's loss.

    Every random draw (batches, timesteps, noise) comes from a generator seeded with
    ``settings.seed``; the model ends with the EMA weights, in eval mode.
    """
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise TypeError(
            "`images` must be a (N, C, H, W) float tensor in [-1, 1]; got "
            f"{type(images).__name__} {tuple(getattr(images, 'shape', ()))}."
        )
    if tuple(images.shape[1:]) != model.config.image_shape:
        raise ValueError(
            f"`images` must have shape (N, {', '.join(map(str, model.config.image_shape))}); "
            f"got {tuple(images.shape)}."
        )
    schedule = Schedule.of(model)
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )

    def lr_factor(step: int) -> float:
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        progress_ = (step - settings.warmup) / max(1, settings.iterations - settings.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    average = copy.deepcopy(model).eval()
    average.requires_grad_(False)
    model.train()
    window: list[list[float]] = []
    log: dict[str, list[float]] = {"total": [], "noise": [], "uncertainty": [], "weighted": []}
    logged: list[int] = []
    n = images.shape[0]
    steps = range(settings.iterations)
    for step in progress_bar(steps, enabled=progress, desc="training the denoiser"):
        batch = images[torch.randint(0, n, (settings.batch_size,), generator=generator)]
        t = torch.randint(0, model.config.steps, (settings.batch_size,), generator=generator)
        noise = torch.randn(batch.shape, generator=generator)  # (B, C, H, W)
        out = model(schedule.add_noise(batch, noise, t), t)
        loss = deediff_loss(out.eps, out.uncertainty, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            decay = min(settings.ema, (1 + step) / (10 + step))  # short memory at the start
            for kept, current in zip(average.parameters(), model.parameters(), strict=True):
                kept.lerp_(current, 1.0 - decay)
        window.append(
            [float(v.detach()) for v in (loss.total, loss.noise, loss.uncertainty, loss.weighted)]
        )
        if len(window) == settings.log_every or step == settings.iterations - 1:
            means = np.mean(np.asarray(window, dtype=np.float64), axis=0)
            for key, value in zip(log, means, strict=True):
                log[key].append(float(value))
            logged.append(step + 1)
            window = []
    model.load_state_dict(average.state_dict())
    model.eval()
    return TrainHistory(
        iteration=np.asarray(logged, dtype=np.int64),
        **{key: np.asarray(values, dtype=np.float64) for key, values in log.items()},
    )


def load_or_train(
    images: Tensor,
    *,
    dataset: str,
    data_fingerprint: str,
    config: DenoiserConfig,
    settings: TrainSettings,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> CachedModel[Denoiser]:
    """Train the denoiser on ``images`` (N, C, H, W) in [-1, 1], or reuse a cached one.

    The cache entry (see :func:`exitguard.tasks.common.cached_model`) is keyed by the
    dataset's fingerprint, the architecture, the training settings and the torch version.
    """

    def build() -> Denoiser:
        return Denoiser(config)

    def fit(module: Denoiser) -> dict[str, Any]:
        history = train_denoiser(module, images, settings=settings, progress=progress)
        return {"history": history.to_dict()}

    data = DataKey(dataset, data_fingerprint)
    entry = MODELS.entry(data, model=config, train=settings, n_train=int(images.shape[0]))
    return entry.load_or_train(build, fit, cache_dir=cache_dir, log=log)
