"""DDPM noise schedule, seeded noise, and ancestral sampling with per-step early exit.

Sampling runs ``T`` denoising steps; step ``s = 0..T-1`` denoises timestep ``t = T - 1 - s``:

    x0   = clip((x_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t), -1, 1)
    mean = sqrt(abar_{t-1}) * beta_t / (1 - abar_t) * x0
           + sqrt(alpha_t) * (1 - abar_{t-1}) / (1 - abar_t) * x_t
    x_{t-1} = mean + sqrt(beta_t) * z_s        (no noise at t = 0; sigma_t^2 = beta_t)

where ``eps`` is the noise prediction of the exit the sample takes at that step (the full
model's under the never-exit threshold ``inf``).

**Thresholds.** One threshold for every sample, exit and step; one per sample (B,); one per
sample and exit (B, L - 1) (a threshold vector, e.g. from a policy's ``thresholds``); or one
per sample, step and exit (B, T, L - 1) (a per-step schedule); or an
:class:`~exitguard.ExitPolicy`, whose :meth:`~exitguard.ExitPolicy.exit_thresholds` apply at
every step. A leading axis of 1 is shared by every sample. ``inf`` disables an exit.

**The same-noise guarantee.** All randomness comes from :func:`sample_noise`: sample ``i``
of seed ``seed`` gets one array (T, C, H, W) drawn from ``numpy.random.default_rng([seed,
stream, i])``; slice 0 is x_T and slice ``s + 1`` is the noise ``z_s`` added after step
``s``. The noise of a sample thus depends only on (seed, stream, sample index, step), never on
the batch it runs in, the threshold, or which samples exited; the samplers only consume it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from torch import Tensor

from exitguard.policy import ExitPolicy
from exitguard.risk._validation import check_int
from exitguard.risk.exits import check_thresholds, first_exit
from exitguard.tasks.diffusion.model import Denoiser

# ----------------------------------------------------------------------------- schedule


def linear_betas(
    steps: int, *, beta_start: float = 1e-4, beta_end: float = 0.02, reference_steps: int = 1000
) -> NDArray[np.float64]:
    """DDPM's linear beta schedule for ``steps`` steps, float64, shape (T,).

    The end points are defined for ``reference_steps`` steps (DDPM: 1e-4 to 0.02 over 1000)
    and scaled by ``reference_steps / steps`` (Nichol & Dhariwal, 2021), so that a shorter
    chain covers the same noise levels: with 100 steps and no scaling the last step would
    keep ``sqrt(abar_T) = 0.6`` of the signal, and sampling from pure noise would start off
    the training distribution. With ``steps == reference_steps`` this is exactly DDPM's.
    """
    check_int(steps, "steps")
    scale = reference_steps / steps
    start, end = beta_start * scale, beta_end * scale
    if not 0.0 < start < end < 1.0:
        raise ValueError(
            f"the scaled schedule must lie in (0, 1); got beta from {start:g} to {end:g} "
            f"(`beta_start`={beta_start!r}, `beta_end`={beta_end!r}, `steps`={steps})."
        )
    return np.linspace(start, end, steps, dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The per-timestep coefficients of :func:`linear_betas`, float64, each of shape (T,)."""

    betas: NDArray[np.float64]

    @classmethod
    def of(cls, model: Denoiser) -> Schedule:
        config = model.config
        return cls(
            linear_betas(
                config.steps,
                beta_start=config.beta_start,
                beta_end=config.beta_end,
                reference_steps=config.reference_steps,
            )
        )

    @property
    def steps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def alpha_bar(self) -> NDArray[np.float64]:
        """(T,) cumulative products of ``1 - beta``."""
        return np.cumprod(1.0 - self.betas, dtype=np.float64)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The forward process: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``; (B, C, H, W)."""
        abar = torch.as_tensor(self.alpha_bar, device=x0.device)[t].to(x0.dtype)  # (B,)
        abar = abar.view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise

    def coefficients(self, t: int) -> tuple[float, float, float, float, float]:
        """(1/sqrt(abar_t), sqrt(1/abar_t - 1), c_x0, c_xt, sigma_t) of timestep ``t``."""
        abar = self.alpha_bar
        abar_t = float(abar[t])
        abar_prev = float(abar[t - 1]) if t > 0 else 1.0
        beta = float(self.betas[t])
        c_x0 = math.sqrt(abar_prev) * beta / (1.0 - abar_t)
        c_xt = math.sqrt(1.0 - beta) * (1.0 - abar_prev) / (1.0 - abar_t)
        sigma = math.sqrt(beta) if t > 0 else 0.0
        return 1.0 / math.sqrt(abar_t), math.sqrt(1.0 / abar_t - 1.0), c_x0, c_xt, sigma

    def step(self, x: Tensor, eps: Tensor, t: int, z: Tensor | None, *, clip: bool) -> Tensor:
        """One ancestral step x_t -> x_{t-1} given the noise prediction (B, C, H, W).

        The same inputs give the same output bit for bit, whatever the batch.
        """
        inv_sqrt_abar, sqrt_ratio, c_x0, c_xt, sigma = self.coefficients(t)
        x0 = inv_sqrt_abar * x - sqrt_ratio * eps  # (B, C, H, W)
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
        mean = c_x0 * x0 + c_xt * x  # (B, C, H, W)
        if t == 0 or z is None:
            return mean
        return mean + sigma * z


# ----------------------------------------------------------------------------- noise


def _check_seed(seed: Any, name: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"`{name}` must be a non-negative integer; got {seed!r}.")
    return int(seed)


def sample_noise(
    indices: ArrayLike,
    *,
    seed: int,
    steps: int,
    image_shape: Sequence[int],
    stream: int = 0,
) -> Tensor:
    """All the noise of the given samples: (B, T, C, H, W) float32.

    Sample ``i`` always gets the same array, drawn from ``default_rng([seed, stream, i])``:
    ``[:, 0]`` is the starting image x_T and ``[:, s + 1]`` the noise added after step ``s``.
    It depends only on (seed, stream, index), so any batch of samples, in any order, with
    any threshold, sees the same noise per sample and step.

    Parameters
    ----------
    indices : int array of shape (B,)
        Non-negative sample indices.
    seed, stream : int
        Non-negative; ``stream`` separates independent sets of samples under one seed (the
        demo draws its threshold grid from stream 1 and its calibration/test samples from
        stream 0).
    steps : int
        T.
    image_shape : (C, H, W)
    """
    seed = _check_seed(seed)
    stream = _check_seed(stream, "stream")
    ids = np.asarray(indices)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or (ids < 0).any():
        raise ValueError(
            f"`indices` must be a 1-D array of non-negative integers; got shape {ids.shape} "
            f"and dtype {ids.dtype}."
        )
    shape = (int(steps), *(int(d) for d in image_shape))
    out = np.empty((ids.size, *shape), dtype=np.float32)  # (B, T, C, H, W)
    for row, index in enumerate(ids.tolist()):  # one stream per sample: the guarantee
        out[row] = np.random.default_rng([seed, stream, index]).standard_normal(
            shape, dtype=np.float32
        )
    return torch.from_numpy(out)


# ----------------------------------------------------------------------------- samplers


def check_threshold(threshold: Any, n: int) -> Tensor:
    """Thresholds as a float64 tensor (n,); each in [0, 1] or ``math.inf`` (the core's check)."""
    if isinstance(threshold, Tensor):
        threshold = threshold.detach().cpu().numpy()
    values = torch.from_numpy(np.array(check_thresholds(threshold), dtype=np.float64))
    if values.ndim == 0:
        values = values.expand(n).clone()
    if values.shape != (n,):
        raise ValueError(
            f"`threshold` must be a scalar or have one value per sample ({n}); got shape "
            f"{tuple(values.shape)}."
        )
    return values


def exit_limits(model: Denoiser, threshold: Any, n: int, *, earliest_exit: int) -> Tensor:
    """Every sample's threshold at every step and exit: float64 (n, T, L - 1).

    ``threshold`` takes any form of the module notes (a float, (n,), (n, L - 1),
    (n, T, L - 1), a leading 1 for all samples, or an ExitPolicy). Exits before
    ``earliest_exit`` get ``inf``: they never fire.
    """
    steps, n_exits = model.config.steps, model.n_exits
    if isinstance(threshold, ExitPolicy):
        threshold = threshold.exit_thresholds(n_exits)[None, :]  # (1, L-1)
    if isinstance(threshold, Tensor):
        threshold = threshold.detach().cpu().numpy()
    values = np.array(check_thresholds(threshold), dtype=np.float64)
    if values.ndim == 0:
        values = values.reshape(1, 1, 1)
    elif values.ndim == 1:
        values = values[:, None, None]  # (n, 1, 1) one per sample
    elif values.ndim == 2:
        values = values[:, None, :]  # (n, 1, L-1) one per sample and exit
    if (
        values.ndim != 3
        or values.shape[0] not in (1, n)
        or values.shape[1] not in (1, steps)
        or values.shape[2] not in (1, n_exits - 1)
    ):
        raise ValueError(
            f"`threshold` must be a float, or have shape ({n},), ({n}, {n_exits - 1}) or "
            f"({n}, {steps}, {n_exits - 1}) (a leading 1 for all samples); got shape "
            f"{np.shape(threshold)}."
        )
    limits = np.broadcast_to(values, (n, steps, n_exits - 1)).copy()  # (n, T, L-1)
    limits[:, :, :earliest_exit] = math.inf  # exits before the earliest never fire
    return torch.from_numpy(limits)


def _check_noise(model: Denoiser, noise: Any) -> Tensor:
    if not isinstance(noise, Tensor):
        raise TypeError(f"`noise` must be a torch.Tensor; got {type(noise).__name__}.")
    expected = (model.config.steps, *model.config.image_shape)
    if noise.ndim != 5 or tuple(noise.shape[1:]) != expected or noise.shape[0] == 0:
        raise ValueError(
            f"`noise` must have shape (B, {', '.join(map(str, expected))}) (B samples, T steps, "
            f"C, H, W; see sample_noise); got {tuple(noise.shape)}."
        )
    return noise


def _checked_inputs(
    model: Denoiser, noise: Any, threshold: Any, earliest_exit: Any
) -> tuple[Tensor, int, Tensor]:
    """The checked ``noise``, ``earliest_exit`` and thresholds (B, T, L - 1) of a sampler."""
    noise = _check_noise(model, noise)
    earliest_exit = model.check_earliest_exit(earliest_exit)
    limits = exit_limits(model, threshold, noise.shape[0], earliest_exit=earliest_exit)
    return noise, earliest_exit, limits


def _run_chain(
    model: Denoiser,
    noise: Tensor,
    predict: Callable[[Tensor, int, int], Tensor],
    *,
    clip: bool,
) -> Tensor:
    """The ancestral chain from ``x_T = noise[:, 0]`` to ``x_0`` (B, C, H, W).

    ``predict(x, s, t)`` gives the noise prediction (B, C, H, W) at step ``s`` (timestep
    ``t = T - 1 - s``); how it is made (one exit per sample, the full model, a full pass and
    the exit rule) is the only thing the samplers differ in.
    """
    schedule = Schedule.of(model)
    steps = schedule.steps
    x = noise[:, 0]  # (B, C, H, W)
    for s in range(steps):  # a loop over steps: sampling is sequential
        t = steps - 1 - s
        eps = predict(x, s, t)  # (B, C, H, W)
        x = schedule.step(x, eps, t, noise[:, s + 1] if t > 0 else None, clip=clip)
    return x


@dataclasses.dataclass(frozen=True, repr=False)
class SampleResult:
    """Generated images and the exit every sample took at every step.

    Attributes
    ----------
    images : Tensor of shape (B, C, H, W)
        The samples x_0 in [-1, 1] (see :func:`to_unit` for [0, 1]).
    exits : int64 Tensor of shape (B, T)
        ``exits[i, s]``: 0-based exit of sample ``i`` at step ``s`` (timestep ``T - 1 - s``).
    threshold : float64 Tensor of shape (B, T, L - 1)
        The threshold of every exit at every step that each sample ran under (``inf``: the
        exit could not fire, e.g. before ``earliest_exit``).
    confidence : float64 Tensor of shape (B, T, L - 1) or None
        Every intermediate exit's confidence at every step (``simulate`` only).
    """

    images: Tensor
    exits: Tensor
    threshold: Tensor
    confidence: Tensor | None = None

    def __repr__(self) -> str:
        return (
            f"SampleResult(images={tuple(self.images.shape)}, "
            f"mean_exit={float(self.exits.double().mean()):.3f})"
        )


def to_unit(images: Tensor) -> Tensor:
    """Images from [-1, 1] to [0, 1] (clamped)."""
    return ((images + 1.0) / 2.0).clamp(0.0, 1.0)


@torch.inference_mode()
def sample(
    model: Denoiser,
    noise: Tensor,
    *,
    threshold: float | ArrayLike | ExitPolicy = math.inf,
    earliest_exit: int = 1,
    clip: bool = True,
) -> SampleResult:
    """Ancestral DDPM sampling with early exit at every step, really skipping compute.

    At every step each sample leaves at the first exit ``l >= earliest_exit`` whose
    confidence ``1 - mean(u_l)`` is ``>= threshold`` (else the last exit) and steps with
    that exit's noise prediction (:meth:`Denoiser.denoise`: after each block only the samples
    still running go on). With ``threshold=math.inf`` no UEM runs and the result equals
    :func:`sample_full`'s bit for bit.

    Parameters
    ----------
    model : Denoiser
    noise : Tensor of shape (B, T, C, H, W)
        From :func:`sample_noise`.
    threshold : float, array or ExitPolicy
        In [0, 1], or ``math.inf`` (never exit early): one value for all, one per sample
        (B,), per sample and exit (B, L - 1), per sample, step and exit (B, T, L - 1), or a
        policy's exit thresholds (see the module notes).
    earliest_exit : int
        No sample leaves before this exit (DeeDiff: 1).
    clip : bool
        Clip the predicted x_0 to [-1, 1] at every step.

    Returns
    -------
    SampleResult
    """
    noise, earliest_exit, limits = _checked_inputs(model, noise, threshold, earliest_exit)
    exits = torch.empty(limits.shape[:2], dtype=torch.long)  # (B, T)

    def predict(x: Tensor, s: int, t: int) -> Tensor:
        eps, exits[:, s] = model.denoise(
            x, t, threshold=limits[:, s], earliest_exit=earliest_exit
        )  # (B, L-1) thresholds of this step
        return eps

    return SampleResult(_run_chain(model, noise, predict, clip=clip), exits, limits)


@torch.inference_mode()
def sample_full(model: Denoiser, noise: Tensor, *, clip: bool = True) -> SampleResult:
    """The plain full-model sampler: every block at every step, the last exit only."""
    noise = _check_noise(model, noise)
    x = _run_chain(model, noise, lambda x, s, t: model.full(x, t), clip=clip)  # (B, C, H, W)
    n, steps = noise.shape[:2]
    exits = torch.full((n, steps), model.n_exits - 1, dtype=torch.long)
    limits = torch.full((n, steps, model.n_exits - 1), math.inf, dtype=torch.float64)
    return SampleResult(x, exits, limits)


def exit_rule(confidence: Tensor, threshold: Tensor, *, earliest_exit: int) -> Tensor:
    """The exit rule on confidences: (B, L - 1) float64 and thresholds -> (B,) exits.

    ``threshold`` is (B,) (one per sample) or (B, L - 1) (one per sample and exit). The first
    exit ``l >= earliest_exit`` with ``confidence[:, l] >= threshold[:, l]``; else ``L - 1``.
    """
    limits = threshold[:, None] if threshold.ndim == 1 else threshold  # (B, 1) or (B, L-1)
    limits = limits.expand(confidence.shape).clone()  # (B, L-1)
    limits[:, :earliest_exit] = math.inf  # exits before the earliest never fire
    return first_exit(confidence, limits)  # (B,) the core's rule


@torch.inference_mode()
def simulate(
    model: Denoiser,
    noise: Tensor,
    *,
    threshold: float | ArrayLike | ExitPolicy = math.inf,
    earliest_exit: int = 1,
    clip: bool = True,
) -> SampleResult:
    """The offline reference for :func:`sample`: at every step a full pass, then the exit rule.

    Every block, exit and UEM runs on every sample at every step, so nothing is saved; the
    trajectories and exits are those of :func:`sample` (up to the last bits of kernels that
    depend on the batch size), and every exit's confidence is recorded.
    """
    noise, earliest_exit, limits = _checked_inputs(model, noise, threshold, earliest_exit)
    exits = torch.empty(limits.shape[:2], dtype=torch.long)  # (B, T)
    confidence = torch.empty(limits.shape, dtype=torch.float64)  # (B, T, L-1)
    rows = torch.arange(limits.shape[0])

    def predict(x: Tensor, s: int, t: int) -> Tensor:
        out = model(x, t)  # eps (B, L, C, H, W), uncertainty (B, L-1, C, H, W)
        confidence[:, s] = out.confidence
        exits[:, s] = exit_rule(confidence[:, s], limits[:, s], earliest_exit=earliest_exit)
        return out.eps[rows, exits[:, s]]  # (B, C, H, W)

    x = _run_chain(model, noise, predict, clip=clip)  # (B, C, H, W)
    return SampleResult(x, exits, limits, confidence)


def generate(
    model: Denoiser,
    indices: ArrayLike,
    *,
    seed: int,
    threshold: float | ExitPolicy = math.inf,
    earliest_exit: int = 1,
    batch_size: int = 64,
    stream: int = 0,
) -> SampleResult:
    """:func:`sample` the given sample indices of a seed, ``batch_size`` at a time.

    ``threshold`` is one float for every sample, or a policy (its exit thresholds at every
    step).
    """
    ids = np.asarray(indices)
    check_int(batch_size, "batch_size")
    parts = []
    for start in range(0, ids.size, batch_size):  # a loop over batches: bounded memory
        noise = sample_noise(
            ids[start : start + batch_size],
            seed=seed,
            steps=model.config.steps,
            image_shape=model.config.image_shape,
            stream=stream,
        )
        parts.append(sample(model, noise, threshold=threshold, earliest_exit=earliest_exit))
    return SampleResult(
        torch.cat([p.images for p in parts]),
        torch.cat([p.exits for p in parts]),
        torch.cat([p.threshold for p in parts]),
    )
