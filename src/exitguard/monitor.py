"""Keep the promise after deployment: watch a certified policy's risk on audited samples.

``RiskMonitor`` reads the losses of *audited* samples (a random share that also ran to the
last exit; see :meth:`exitguard.nn.EarlyExitNetwork.infer` with ``audit=``) one batch at a
time and raises an alarm when the policy's risk is shown to exceed its target, with the
anytime-valid statistics of :mod:`exitguard.risk.monitor`:

* the **e-process** alarms when its wealth reaches ``1 / alpha``: if the policy's risk never
  exceeds epsilon, the probability of *ever* raising this alarm is at most ``alpha``,
  whenever and however often the monitor is read;
* the **change detector** (e-CUSUM) alarms when its statistic reaches ``A``: without a
  change, the average number of audits to a false alarm is at least ``A`` (``arl``), or, with
  a ``horizon`` of ``T`` audits, ``P(a false alarm within T audits) <= alpha`` (``A = T /
  alpha``). It finds a change after a long good period quickly;
* a **confidence sequence** for the mean audited loss, for reports.

Assumptions: audit decisions are independent coin flips taken before the sample's loss is
known; audited losses lie in the policy risk's range; the statistics bet using earlier audits
only. On an alarm the safe action is the full model (never exit early), which is trivially
certified, until :func:`recalibrate` certifies a policy on recent audits.

The monitor's state is a small JSON document with a content digest, written atomically, so a
service restart loses no evidence and a tampered file is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from exitguard._files import atomic_write_text, load_json
from exitguard.policy import ExitPolicy, _canonical
from exitguard.risk import monitor as stats
from exitguard.risk import procedures
from exitguard.risk._validation import check_int, check_open_unit, check_positive

_SCHEMA = "exitguard.RiskMonitor"
_VERSION = 1


class MonitorFileError(ValueError):
    """A monitor state file that cannot be used (damaged, edited, or for another policy)."""


def loss_range(policy: ExitPolicy) -> tuple[float, float]:
    """The range of a policy's per-sample losses: [0, 1] for 0-1 consistency, [-B, B] else."""
    if policy.risk == "prediction_consistency":
        return 0.0, 1.0
    return -float(policy.loss_bound), float(policy.loss_bound)


@dataclasses.dataclass(frozen=True)
class MonitorStatus:
    """The monitor after a batch of audited losses.

    Attributes
    ----------
    audits : int
        Audited losses read so far.
    alarm : bool
        Whether an alarm has been raised (alarms latch until :meth:`RiskMonitor.reset`).
    reason : str or None
        ``"e-process"`` or ``"change detector"`` for the first alarm.
    alarm_at : int or None
        The audit (1-based) at which it was raised.
    wealth : float
        The e-process's wealth; the alarm threshold is ``1 / alpha``.
    detector : float
        The e-CUSUM statistic; the alarm threshold is ``detector_threshold``.
    risk_low, risk_high : float
        The confidence sequence for the mean audited loss, now.
    action : str
        What to do: keep the policy, or fall back to the full model and recalibrate.
    """

    audits: int
    alarm: bool
    reason: str | None
    alarm_at: int | None
    wealth: float
    detector: float
    risk_low: float
    risk_high: float
    action: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class RiskMonitor:
    """Watch a certified policy's risk on audited losses, with anytime-valid alarms.

    Parameters
    ----------
    policy : ExitPolicy
        The deployed policy; its target risk and risk (loss range) are the defaults.
    alpha : float in (0, 1)
        Level of the e-process (probability of ever alarming without cause) and of the
        confidence sequence.
    target_risk : float, optional
        Epsilon to watch (default: the policy's).
    arl : float, optional
        Average run length (in audits) before a false alarm of the change detector; the
        detector alarms at ``A = arl``. Default 100,000 audits unless ``horizon`` is given.
    horizon : int, optional
        Instead of ``arl``: a number of audits ``T`` over which the detector's false-alarm
        probability is at most ``alpha`` (``A = T / alpha``).
    window : int, optional
        Audits the bets are estimated from (default ``ceil(5 / epsilon)``).
    """

    def __init__(
        self,
        policy: ExitPolicy,
        *,
        alpha: float = 0.05,
        target_risk: float | None = None,
        arl: float | None = None,
        horizon: int | None = None,
        window: int | None = None,
    ) -> None:
        if not isinstance(policy, ExitPolicy):
            raise TypeError(f"`policy` must be an ExitPolicy; got {type(policy).__name__}.")
        self.policy = policy
        self.alpha = check_open_unit(alpha, "alpha")
        self.target_risk = check_open_unit(
            policy.target_risk if target_risk is None else target_risk, "target_risk"
        )
        self.loss_min, self.loss_max = loss_range(policy)
        if not (self.loss_min < self.target_risk < self.loss_max):
            raise ValueError(
                f"`target_risk` must lie inside the losses' range [{self.loss_min:g}, "
                f"{self.loss_max:g}]; got {self.target_risk:g}."
            )
        if arl is None and horizon is None:
            arl = 1e5
        self.detector_threshold = stats.detector_threshold(
            arl=arl, horizon=horizon, alpha=self.alpha
        )
        default = stats.default_settings(self.target_risk)
        self.settings = stats.BetSettings(
            window=default.window if window is None else check_int(window, "window", minimum=1),
            fraction=default.fraction,
        )
        self.state = stats.MonitorState()
        self.reason: str | None = None
        self.alarm_at: int | None = None

    # ------------------------------------------------------------------ reading audits

    def update(self, losses: ArrayLike) -> MonitorStatus:
        """Read a batch of audited losses (in time order) and return the status."""
        batch = np.asarray(losses, dtype=np.float64).reshape(-1)
        trajectory, self.state = stats.update(
            batch,
            self.state,
            target_risk=self.target_risk,
            alpha=self.alpha,
            loss_min=self.loss_min,
            loss_max=self.loss_max,
            settings=self.settings,
        )
        if self.alarm_at is None and batch.size:
            start = self.state.count - batch.size
            wealth_hit = trajectory["log_wealth"] >= math.log(1.0 / self.alpha)
            detector_hit = trajectory["log_cusum"] >= math.log(self.detector_threshold)
            first = {
                "e-process": int(np.argmax(wealth_hit)) if wealth_hit.any() else None,
                "change detector": int(np.argmax(detector_hit)) if detector_hit.any() else None,
            }
            raised = {name: at for name, at in first.items() if at is not None}
            if raised:
                self.reason = min(raised, key=lambda name: raised[name])
                self.alarm_at = start + raised[self.reason] + 1
                warnings.warn(
                    f"risk alarm ({self.reason}) at audit {self.alarm_at}: the policy's risk "
                    f"is shown to exceed {self.target_risk:g}. Fall back to the full model "
                    "(monitor.active_policy) and recalibrate on recent audits.",
                    RiskAlarmWarning,
                    stacklevel=2,
                )
        return self.status()

    def status(self) -> MonitorStatus:
        alarm = self.alarm_at is not None
        action = (
            "fall back to the full model (never exit early) and recalibrate on recent audits"
            if alarm
            else "keep the policy"
        )
        low, high = self.risk_interval()
        return MonitorStatus(
            audits=self.state.count,
            alarm=alarm,
            reason=self.reason,
            alarm_at=self.alarm_at,
            wealth=math.exp(min(self.state.log_wealth, 700.0)),
            detector=math.exp(min(self.state.log_cusum, 700.0)),
            risk_low=low,
            risk_high=high,
            action=action,
        )

    def risk_interval(self) -> tuple[float, float]:
        """The confidence sequence for the mean audited loss, on the loss scale."""
        scale = self.loss_max - self.loss_min
        return (
            self.loss_min + scale * self.state.cs_low,
            self.loss_min + scale * self.state.cs_high,
        )

    @property
    def alarm(self) -> bool:
        return self.alarm_at is not None

    @property
    def active_policy(self) -> ExitPolicy:
        """The policy to serve now: the certified one, or the full model after an alarm."""
        return self.policy.full_model() if self.alarm else self.policy

    def reset(self, policy: ExitPolicy) -> None:
        """Start watching a new (recalibrated) policy, with fresh statistics."""
        fresh = RiskMonitor(
            policy,
            alpha=self.alpha,
            target_risk=policy.target_risk,
            arl=self.detector_threshold,
            window=self.settings.window,
        )
        self.__dict__.update(fresh.__dict__)

    # -------------------------------------------------------------------- persistence

    def to_dict(self) -> dict[str, Any]:
        """The monitor as JSON-ready data with a content digest."""
        payload = {
            "schema": _SCHEMA,
            "schema_version": _VERSION,
            "policy_digest": self.policy.digest,
            "alpha": self.alpha,
            "target_risk": self.target_risk,
            "loss_min": self.loss_min,
            "loss_max": self.loss_max,
            "detector_threshold": self.detector_threshold,
            "window": self.settings.window,
            "fraction": self.settings.fraction,
            "state": self.state.to_dict(),
            "reason": self.reason,
            "alarm_at": self.alarm_at,
        }
        return {**payload, "digest": "sha256:" + hashlib.sha256(_canonical(payload)).hexdigest()}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the state atomically (a failed write keeps the previous state file)."""
        import json

        return atomic_write_text(
            path, json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n", argument="state"
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, policy: ExitPolicy) -> RiskMonitor:
        """Resume a monitor saved by :meth:`save` for ``policy`` (digests checked)."""
        data = load_json(path, max_bytes=16 << 20, max_depth=6, argument="state")
        return cls.from_dict(data, policy=policy)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, policy: ExitPolicy) -> RiskMonitor:
        if not isinstance(data, Mapping) or data.get("schema") != _SCHEMA:
            raise MonitorFileError(f"not an exitguard monitor state (schema {_SCHEMA!r}).")
        if data.get("schema_version") != _VERSION:
            raise MonitorFileError(
                f"`schema_version` must be {_VERSION}; got {data.get('schema_version')!r}."
            )
        payload = {k: v for k, v in data.items() if k != "digest"}
        try:
            canonical = _canonical(payload)
        except (TypeError, ValueError) as error:
            raise MonitorFileError(
                f"a monitor state must hold only JSON values: {error}."
            ) from error
        if data.get("digest") != "sha256:" + hashlib.sha256(canonical).hexdigest():
            raise MonitorFileError(
                "the monitor state does not match its `digest`: it was edited or damaged."
            )
        if data.get("policy_digest") != policy.digest:
            raise MonitorFileError(
                "the monitor state belongs to another policy (its `policy_digest` differs)."
            )
        try:
            monitor = cls(
                policy,
                alpha=float(data["alpha"]),
                target_risk=float(data["target_risk"]),
                arl=float(data["detector_threshold"]),
                window=int(data["window"]),
            )
            monitor.state = stats.MonitorState.from_dict(data["state"])
        except (KeyError, TypeError, ValueError) as error:
            raise MonitorFileError(f"the monitor state is malformed: {error}.") from error
        monitor.reason = data.get("reason")
        monitor.alarm_at = data.get("alarm_at")
        return monitor

    def __repr__(self) -> str:
        status = self.status()
        return (
            f"RiskMonitor(target_risk={self.target_risk:g}, alpha={self.alpha:g}, "
            f"audits={status.audits}, alarm={status.alarm}, wealth={status.wealth:.3g})"
        )


class RiskAlarmWarning(UserWarning):
    """A monitor shows that a deployed policy's risk exceeds its target."""


def samples_needed(
    *,
    target_risk: float,
    delta: float,
    procedure: str = "ucb-wsr",
    loss_bound: float = 1.0,
    limit: int = 10_000_000,
) -> int:
    """The fewest calibration samples with which ``procedure`` can certify anything.

    That is the smallest ``n`` for which even a loss-free early-exit row passes the
    procedure's test at ``(target_risk, delta)``: with fewer samples (e.g. a recalibration
    window of audits) nothing can be certified, whatever the data. More samples are needed
    when the losses are not all zero.
    """
    eps = check_open_unit(target_risk, "target_risk")
    level = check_open_unit(delta, "delta")
    bound = check_positive(loss_bound, "loss_bound")
    chosen = procedures.get_procedure(procedure)
    if not chosen.has_guarantee:
        raise ValueError(f"{chosen.name!r} certifies nothing: it has no guarantee.")

    def certifies(n: int) -> bool:
        table = np.zeros((2, n))
        stat = chosen.statistic(table, np.array([eps]), delta=level, loss_bound=bound)
        ok = chosen.passes(stat, np.array([eps]), delta=level, n_rows=2)
        return bool(ok[0, 1])

    low, high = 1, 2
    while not certifies(high):  # doubling, then bisection on the smallest passing n
        low, high = high, high * 2
        if high > limit:
            raise ValueError(f"{chosen.name!r} certifies nothing with up to {limit} samples.")
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if certifies(middle) else (middle, high)
    return high


def recalibrate(
    exit_probs: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    policy: ExitPolicy,
    window: int | None = None,
    thresholds: ArrayLike | None = None,
    seed: int | None = None,
) -> ExitPolicy:
    """Certify a new policy on the most recent audited samples, like ``policy`` was.

    Audited samples ran every exit, so their per-exit outputs ``exit_probs`` (n, L, C), in
    time order, are a calibration set from the current distribution. The last ``window``
    samples (default: all) are calibrated with the policy's risk, procedure, target risk,
    delta and confidence measure; the guarantee is the usual one, for data like that window.
    When the window holds fewer than :func:`samples_needed` samples, nothing can be certified
    and the answer is the full model (with a warning saying how many are needed).
    """
    from exitguard.calibration import calibrate

    probs = np.asarray(exit_probs)
    if window is not None:
        check_int(window, "window", minimum=2)
        probs = probs[-window:]
        labels = None if labels is None else np.asarray(labels)[-window:]
    if policy.risk is None or policy.confidence is None:
        raise ValueError("`policy` must record its risk and confidence measure to be recalibrated.")
    needed = samples_needed(
        target_risk=policy.target_risk,
        delta=policy.delta,
        procedure=policy.procedure,
        loss_bound=policy.loss_bound,
    )
    if len(probs) < needed:
        warnings.warn(
            f"the recalibration window holds {len(probs)} audited samples; {policy.procedure!r} "
            f"needs at least {needed} to certify anything at target_risk="
            f"{policy.target_risk:g}, delta={policy.delta:g}.",
            stacklevel=2,
        )
    new = calibrate(
        probs,
        labels,
        risk=policy.risk,
        target_risk=policy.target_risk,
        delta=policy.delta,
        procedure=policy.procedure,
        confidence=policy.confidence,
        thresholds=thresholds,
        seed=seed,
    )
    return dataclasses.replace(
        new, n_exits=policy.n_exits, model_fingerprint=policy.model_fingerprint
    )
