"""Anytime-valid statistics for watching a certified policy's risk after deployment.

A fraction of the served samples is *audited*: it also runs to the last exit, which gives the
policy's loss against the full model on those samples (``audited losses``, one per audited
sample, in ``[loss_min, loss_max]``). Three statistics read them, each valid at every moment,
however often it is looked at (Ville's inequality), not only at the end of a test:

* **e-process** (a test of "the policy's risk is at most epsilon"): the wealth
  ``W_t = prod_{i<=t} (1 + lambda_i (l_i - epsilon))`` of a gambler betting that the losses
  run above epsilon, with bets ``lambda_i`` chosen from earlier audits only (predictable).
  If every audited loss has conditional mean at most epsilon given the past, ``W`` is a
  nonnegative supermartingale and ``P(W_t >= 1/alpha for some t) <= alpha``.
* **e-detectors** for a change after a long good period (Shin, Ramdas and Rinaldo, 2023):
  e-CUSUM ``M_t = max(M_{t-1}, 1) * E_t`` and e-Shiryaev-Roberts ``R_t = (R_{t-1} + 1) E_t``
  with the same one-step e-values ``E_t = 1 + lambda_t (l_t - epsilon)``. Without a change,
  ``R_t - t`` is a supermartingale, so an alarm at ``R_t >= A`` has an average run length of
  at least ``A`` audits, and ``P(alarm within the first T audits) <= T / A``; ``M_t <= R_t``,
  so the same holds for e-CUSUM. Choose ``A`` from the run length you can live with, not
  ``1/alpha`` (an average run length of 20 audits is an alarm a day), or from a horizon.
* **confidence sequence** for the mean audited loss (Waudby-Smith and Ramdas, 2023,
  "Estimating means of bounded random variables by betting", Theorem 2, predictable
  plug-in empirical Bernstein): intervals that cover the mean at every time at once with
  probability at least ``1 - alpha``, when the audited losses share one conditional mean (no
  drift); under drift it covers the running mean of the conditional means only
  approximately, which is why alarms come from the two tests above.

Assumptions, stated once: the audit decisions are independent coin flips (probability
``rho``) made before the sample's loss is known, so the audited losses are a random sample of
the served ones; losses lie in ``[loss_min, loss_max]``; bets use only earlier audits.

Everything here is vectorised over leading axes (many streams at once) and resumable: a
:class:`MonitorState` carries what the next batch needs, so feeding a stream in batches gives
exactly the same statistics as feeding it at once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from exitguard.risk._validation import as_float_array, check_int, check_open_unit

Array = NDArray[np.float64]

_NEG_INF = -math.inf


@dataclasses.dataclass(frozen=True)
class BetSettings:
    """How the gambler bets (shared by the e-process and the e-detectors).

    Attributes
    ----------
    window : int
        Number of most recent audits the bet is estimated from; a short window reacts to a
        change quickly, a long one bets more steadily. Default ``ceil(5 / epsilon)``.
    fraction : float in (0, 1]
        Share of the largest safe bet ``1 / (epsilon - loss_min)`` that is ever staked.
    """

    window: int
    fraction: float = 0.5


@dataclasses.dataclass(frozen=True)
class MonitorState:
    """What a monitor carries from one batch of audited losses to the next (all floats)."""

    count: int = 0
    log_wealth: float = 0.0
    log_cusum: float = 0.0
    log_sr: float = _NEG_INF
    recent: tuple[float, ...] = ()
    cs_sum: float = 0.0  # sum of rescaled losses
    cs_sq: float = 0.0  # sum of (x_i - mean_i)^2
    cs_lambda: float = 0.0  # sum of lambda_i
    cs_lambda_x: float = 0.0  # sum of lambda_i x_i
    cs_penalty: float = 0.0  # sum of v_i psi(lambda_i)
    cs_low: float = 0.0  # running intersection, on the rescaled [0, 1] scale
    cs_high: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["recent"] = list(self.recent)
        data["log_sr"] = None if math.isinf(self.log_sr) else self.log_sr
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MonitorState:
        values = dict(data)
        values["recent"] = tuple(float(v) for v in values.get("recent", ()))
        if values.get("log_sr") is None:
            values["log_sr"] = _NEG_INF
        values["count"] = int(values.get("count", 0))
        return cls(**values)


def bets(
    losses: Array,
    *,
    target_risk: float,
    loss_min: float,
    loss_max: float,
    settings: BetSettings,
    recent: Array | None = None,
) -> Array:
    """Predictable bets for the losses (..., T): bet t uses only ``recent`` and losses < t.

    A windowed GRAPA bet: with ``m`` and ``v`` the mean and variance of the last ``window``
    audits (shrunk toward epsilon by one pseudo-observation), the bet is
    ``(m - eps) / (v + (m - eps)^2)`` clipped to ``[0, fraction / (eps - loss_min)]``: zero
    while the losses do not run above epsilon, so good periods cost no wealth.
    """
    history = np.zeros((*losses.shape[:-1], 0)) if recent is None else recent
    joined = np.concatenate(
        [np.broadcast_to(history, losses.shape[:-1] + history.shape[-1:]), losses], axis=-1
    )
    offset = history.shape[-1]
    total = losses.shape[-1]
    first = np.concatenate([np.zeros((*joined.shape[:-1], 1)), np.cumsum(joined, axis=-1)], axis=-1)
    second = np.concatenate(
        [np.zeros((*joined.shape[:-1], 1)), np.cumsum(np.square(joined), axis=-1)], axis=-1
    )
    end = offset + np.arange(total)  # the bet at step t reads joined[start : end]
    start = np.maximum(end - settings.window, 0)
    count = (end - start).astype(np.float64)  # (T,)
    sums = first[..., end] - first[..., start]  # (..., T)
    squares = second[..., end] - second[..., start]
    mean = (sums + target_risk) / (count + 1.0)  # one pseudo-observation at epsilon
    spread = (loss_max - loss_min) ** 2 / 4.0
    variance = (squares - count * np.square(mean) + spread) / (count + 1.0)
    variance = np.maximum(variance, 1e-12)
    edge = mean - target_risk
    cap = settings.fraction / (target_risk - loss_min)
    return np.clip(edge / (variance + np.square(edge)), 0.0, cap)


def _log_factors(losses: Array, bet: Array, target_risk: float) -> Array:
    return np.log1p(bet * (losses - target_risk))


def update(
    losses: ArrayLike,
    state: MonitorState | None = None,
    *,
    target_risk: float,
    alpha: float,
    loss_min: float,
    loss_max: float,
    settings: BetSettings,
) -> tuple[dict[str, Array], MonitorState]:
    """Statistics after each of a batch of audited losses of ONE stream, and the next state.

    Returns ``(trajectory, state)``: ``trajectory`` holds arrays (T,) ``log_wealth``,
    ``log_cusum``, ``log_sr``, ``risk_low``, ``risk_high`` (the confidence sequence on the
    loss scale) and ``bet``; ``state`` resumes the stream exactly where the batch ended.
    """
    x = as_float_array(losses, "losses", ndim=1)  # (T,)
    if x.size and (x.min() < loss_min - 1e-12 or x.max() > loss_max + 1e-12):
        raise ValueError(
            f"`losses` must lie in [loss_min, loss_max] = [{loss_min:g}, {loss_max:g}]; got "
            f"values in [{x.min():.6g}, {x.max():.6g}]."
        )
    current = state if state is not None else MonitorState()
    recent = np.asarray(current.recent, dtype=np.float64)
    trajectory = statistics(
        x[None],
        target_risk=target_risk,
        alpha=alpha,
        loss_min=loss_min,
        loss_max=loss_max,
        settings=settings,
        state=current,
    )
    single = {key: value[0] for key, value in trajectory.items()}
    if x.size == 0:
        return single, current
    keep = np.concatenate([recent, x])[-settings.window :]
    scale = loss_max - loss_min
    next_state = MonitorState(
        count=current.count + x.size,
        log_wealth=float(single["log_wealth"][-1]),
        log_cusum=float(single["log_cusum"][-1]),
        log_sr=float(single["log_sr"][-1]),
        recent=tuple(float(v) for v in keep),
        cs_sum=float(trajectory["_cs_sum"][0, -1]),
        cs_sq=float(trajectory["_cs_sq"][0, -1]),
        cs_lambda=float(trajectory["_cs_lambda"][0, -1]),
        cs_lambda_x=float(trajectory["_cs_lambda_x"][0, -1]),
        cs_penalty=float(trajectory["_cs_penalty"][0, -1]),
        cs_low=float((single["risk_low"][-1] - loss_min) / scale),
        cs_high=float((single["risk_high"][-1] - loss_min) / scale),
    )
    return {k: v for k, v in single.items() if not k.startswith("_")}, next_state


def statistics(
    losses: ArrayLike,
    *,
    target_risk: float,
    alpha: float,
    loss_min: float,
    loss_max: float,
    settings: BetSettings | None = None,
    state: MonitorState | None = None,
) -> dict[str, Array]:
    """Every statistic after every audited loss, for many streams at once.

    Parameters
    ----------
    losses : array (..., T)
        Audited losses of each stream, in time order, in ``[loss_min, loss_max]``.
    target_risk, alpha : float in (0, 1)
    loss_min, loss_max : float
        The losses' range (0 and 1 for 0-1 consistency losses; -B and B for signed ones).
        ``loss_min < target_risk < loss_max``.
    settings : BetSettings, optional
        Default: a window of ``ceil(5 / target_risk)`` audits and half the largest safe bet.
    state : MonitorState, optional
        Resume one stream (``losses`` of shape (1, T)) from an earlier batch.

    Returns
    -------
    dict of arrays (..., T)
        ``log_wealth`` (the e-process), ``log_cusum`` and ``log_sr`` (the e-detectors),
        ``risk_low`` / ``risk_high`` (the confidence sequence, running intersection) and
        ``bet``.
    """
    eps = check_open_unit(target_risk, "target_risk")
    level = check_open_unit(alpha, "alpha")
    if not (loss_min < eps < loss_max):
        raise ValueError(
            "`target_risk` must lie strictly inside [loss_min, loss_max]; got "
            f"{eps:g} and [{loss_min:g}, {loss_max:g}]."
        )
    x = as_float_array(losses, "losses", ndim=(1, 2))
    chosen = settings if settings is not None else default_settings(eps)
    start = state if state is not None else MonitorState()
    recent = np.asarray(start.recent, dtype=np.float64)
    bet = bets(
        x, target_risk=eps, loss_min=loss_min, loss_max=loss_max, settings=chosen, recent=recent
    )  # (..., T)
    step = _log_factors(x, bet, eps)  # (..., T) log E_t
    cumulative = np.cumsum(step, axis=-1)  # (..., T)
    log_wealth = start.log_wealth + cumulative
    log_cusum = _cusum(step, start.log_cusum)  # e-CUSUM, in logs
    shifted = np.concatenate([np.zeros((*x.shape[:-1], 1)), cumulative[..., :-1]], axis=-1)
    # e-SR in logs: R_t = e^{S_t} (R_0 + sum_{j<=t} e^{-S_{j-1}}).
    start_terms = np.concatenate(
        [np.full((*x.shape[:-1], 1), start.log_sr), -shifted], axis=-1
    )  # (..., T+1): log R_0, then -S_{j-1}
    log_sr = cumulative + np.logaddexp.accumulate(start_terms, axis=-1)[..., 1:]
    low, high, parts = _confidence_sequence(x, start, level, loss_min, loss_max)
    return {
        "log_wealth": log_wealth,
        "log_cusum": log_cusum,
        "log_sr": log_sr,
        "risk_low": low,
        "risk_high": high,
        "bet": bet,
        **parts,
    }


def _cusum(step: Array, start: float) -> Array:
    """``C_t = max(C_{t-1}, 0) + step_t`` from ``C_0 = start``, vectorised over time.

    With ``S_t`` the cumulative sum, ``C_t = S_t + max(max(start, 0), -min_{0<=s<t} S_s)``:
    the statistic restarts at the lowest point of the walk so far.
    """
    cumulative = np.cumsum(step, axis=-1)
    previous = np.concatenate([np.zeros((*step.shape[:-1], 1)), cumulative[..., :-1]], axis=-1)
    lowest = np.minimum.accumulate(previous, axis=-1)  # min over 0 <= s < t of S_s
    return cumulative + np.maximum(max(start, 0.0), -lowest)


def _confidence_sequence(
    x: Array, start: MonitorState, alpha: float, loss_min: float, loss_max: float
) -> tuple[Array, Array, dict[str, Array]]:
    """Predictable plug-in empirical-Bernstein confidence sequence (WSR 2023, Thm 2)."""
    scale = loss_max - loss_min
    unit = (x - loss_min) / scale  # (..., T) in [0, 1]
    total = x.shape[-1]
    t = start.count + np.arange(1, total + 1, dtype=np.float64)  # (T,) 1-based times
    sums = start.cs_sum + np.cumsum(unit, axis=-1)
    mean = (0.5 + sums) / (t + 1.0)  # mu_t, includes x_t
    mean_before = np.concatenate(
        [
            np.broadcast_to((0.5 + start.cs_sum) / (start.count + 1.0), (*x.shape[:-1], 1)),
            mean[..., :-1],
        ],
        axis=-1,
    )  # mu_{t-1}
    squares = start.cs_sq + np.cumsum(np.square(unit - mean), axis=-1)
    variance = (0.25 + squares) / (t + 1.0)  # sigma^2_t
    variance_before = np.concatenate(
        [
            np.broadcast_to((0.25 + start.cs_sq) / (start.count + 1.0), (*x.shape[:-1], 1)),
            variance[..., :-1],
        ],
        axis=-1,
    )
    log_term = math.log(2.0 / alpha)
    lam = np.minimum(np.sqrt(2.0 * log_term / (variance_before * t * np.log1p(t))), 0.5)
    v = 4.0 * np.square(unit - mean_before)
    psi = (-np.log1p(-lam) - lam) / 4.0
    lam_sum = start.cs_lambda + np.cumsum(lam, axis=-1)
    lam_x = start.cs_lambda_x + np.cumsum(lam * unit, axis=-1)
    penalty = start.cs_penalty + np.cumsum(v * psi, axis=-1)
    centre = lam_x / lam_sum
    width = (log_term + penalty) / lam_sum
    low = np.maximum.accumulate(np.maximum(centre - width, start.cs_low), axis=-1)
    high = np.minimum.accumulate(np.minimum(centre + width, start.cs_high), axis=-1)
    low, high = np.clip(low, 0.0, 1.0), np.clip(high, 0.0, 1.0)
    parts = {
        "_cs_sum": sums,
        "_cs_sq": squares,
        "_cs_lambda": lam_sum,
        "_cs_lambda_x": lam_x,
        "_cs_penalty": penalty,
    }
    return loss_min + scale * low, loss_min + scale * high, parts


def default_settings(target_risk: float) -> BetSettings:
    """A window of ``ceil(5 / epsilon)`` audits and half the largest safe bet."""
    return BetSettings(window=math.ceil(5.0 / target_risk), fraction=0.5)


def detector_threshold(
    *, arl: float | None = None, horizon: int | None = None, alpha: float | None = None
) -> float:
    """The e-detector threshold ``A`` for an average run length or a horizon.

    ``arl``: alarm at ``A = arl``, so that without a change the expected number of audits to a
    false alarm is at least ``arl``. ``horizon`` and ``alpha``: ``A = horizon / alpha``, so that
    ``P(any false alarm within the first horizon audits) <= alpha``.
    """
    if (arl is None) == (horizon is None):
        raise ValueError("give either `arl` or `horizon` (with `alpha`).")
    if arl is not None:
        if not (isinstance(arl, (int, float)) and arl > 1 and math.isfinite(arl)):
            raise ValueError(f"`arl` must be a number > 1 (audits); got {arl!r}.")
        return float(arl)
    span = check_int(horizon, "horizon", minimum=1)
    level = check_open_unit(alpha, "alpha")
    return span / level
