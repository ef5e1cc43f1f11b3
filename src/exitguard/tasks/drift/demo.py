"""The drift demo: a certified policy served on a stream whose images degrade over time.

Steps, each a function below:

1. :func:`prepare` — the classification demo's network (trained or loaded from the cache),
   and a certified policy on a random subset of the clean held-out images; the stream draws
   from all held-out images (the population the guarantee is about).
2. :func:`severity_schedule` — the stream's corruption strength per day: clean days, a ramp,
   then a plateau.
3. :func:`serve` — day by day, audited inference (a random share of the day's samples also
   runs every exit), the monitor fed with the audited losses, the fallback to the full model
   on an alarm, and recalibration on the most recent audits once enough have arrived.
4. :func:`run_demo` — everything end to end, written as a report.

The risk watched is the label-free consistency risk (disagreement with the full model), so
the audits need no labels. The true daily risk of every policy (computed on all samples of
the day with the full model, which a deployment would not do) is kept for the figure only.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from exitguard.calibration import calibrate
from exitguard.monitor import RiskAlarmWarning, RiskMonitor, recalibrate, samples_needed
from exitguard.nn import collect
from exitguard.nn.audit import audited_infer
from exitguard.policy import ExitPolicy
from exitguard.report.results import DriftDay, DriftEvent, DriftResults, MonitorSegment
from exitguard.risk import monitor as monitor_stats
from exitguard.risk.exits import exit_index
from exitguard.tasks import classification
from exitguard.tasks.common import ImageOptions, progress_bar, results_header, write_demo_report
from exitguard.tasks.drift.corrupt import CORRUPTIONS, corrupt


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoConfig(ImageOptions):
    """Settings of :func:`run_demo` (the shared ones: :class:`~exitguard.tasks.common.DemoOptions`;
    ``trials`` is not used).

    The stream has ``days`` days of ``per_day`` samples: ``clean_days`` clean days, then the
    corruption's severity ramps linearly to ``max_severity`` over ``ramp_days`` days and
    stays there. ``audit`` is the audited share; ``recalibration_window`` the number of most
    recent audits a recalibration uses.
    """

    out: str = "exitguard-report/drift"
    n_cal: int = 400
    target_risk: float = 0.1
    alpha: float = 0.05
    arl: float = 1e5
    corruption: str = "rotation"
    days: int = 30
    per_day: int = 1000
    clean_days: int = 10
    ramp_days: int = 5
    max_severity: float = 0.4
    audit: float = 0.05
    recalibration_window: int = 400
    epochs: int | None = None

    def __post_init__(self) -> None:
        if self.corruption not in CORRUPTIONS:
            raise ValueError(
                f"`corruption` must be one of {', '.join(map(repr, CORRUPTIONS))}; got "
                f"{self.corruption!r}."
            )


@dataclasses.dataclass(frozen=True, repr=False)
class Prepared:
    classifier: classification.Prepared
    policy: ExitPolicy
    pool: torch.Tensor  # (P, C, H, W) held-out images the stream draws from
    pool_labels: np.ndarray  # (P,)
    exit_flops: np.ndarray  # (L,)


def prepare(config: DemoConfig, *, log: Callable[[str], None] = print) -> Prepared:
    """The classifier, a certified consistency policy on clean images, and the stream pool."""
    classifier = classification.prepare(
        classification.DemoConfig(  # the main job's data and model, with these options
            **{f.name: getattr(config, f.name) for f in dataclasses.fields(ImageOptions)},
            epochs=config.epochs,
        ),
        log=log,
    )
    network = classifier.network
    order = np.random.default_rng(config.seed + 2).permutation(len(classifier.heldout))
    cal = order[: config.n_cal]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        policy = calibrate(
            classifier.outputs.probs[cal],
            risk="prediction_consistency",
            target_risk=config.target_risk,
            delta=config.delta,
            procedure="ucb-wsr",
            exit_cost=classifier.exit_flops,
            seed=config.seed,
        )
    policy = network.bind_policy(policy)
    # The stream's population is the whole held-out set, of which the calibration set is a
    # random subset: the guarantee is a statement about this population's risk.
    pool = torch.from_numpy(classifier.heldout.images)
    labels = classifier.heldout.labels
    return Prepared(classifier, policy, pool, labels, classifier.exit_flops)


def severity_schedule(config: DemoConfig) -> np.ndarray:
    """Severity of each day (D,): zero, then a linear ramp, then a plateau."""
    days = np.arange(config.days, dtype=np.float64)
    ramp = np.clip((days - config.clean_days + 1) / max(config.ramp_days, 1), 0.0, 1.0)
    return config.max_severity * ramp


def _day_images(
    prepared: Prepared, config: DemoConfig, day: int, severity: float
) -> tuple[torch.Tensor, np.ndarray]:
    """The day's images (drawn from the pool with replacement, then corrupted) and labels."""
    rng = np.random.default_rng([config.seed, day])
    index = rng.integers(0, len(prepared.pool), config.per_day)
    generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
    images = corrupt(
        prepared.pool[torch.from_numpy(index)],
        config.corruption,
        float(severity),
        generator=generator,
    )
    return images, prepared.pool_labels[index]


def _true_risk(policy: ExitPolicy, confidences: np.ndarray, predictions: np.ndarray) -> float:
    """Disagreement with the full model of ``policy`` on every sample of a day."""
    exits = exit_index(confidences, float(policy.threshold))
    rows = np.arange(len(exits))
    return float(np.mean(predictions[rows, exits] != predictions[:, -1]))


def serve(prepared: Prepared, config: DemoConfig) -> dict[str, Any]:
    """Serve the stream day by day with audits, the monitor, fallback and recalibration."""
    network = prepared.classifier.network
    severities = severity_schedule(config)
    original = prepared.policy
    monitored = original  # the policy the monitor watches
    monitor = RiskMonitor(monitored, alpha=config.alpha, arl=config.arl)
    needed = samples_needed(target_risk=config.target_risk, delta=config.delta)
    window = max(config.recalibration_window, needed)
    fallback = False
    pending: list[np.ndarray] = []  # audited exit probabilities since the alarm
    audit_rng = np.random.default_rng(config.seed + 3)
    days: list[dict[str, Any]] = []
    segments: list[dict[str, Any]] = [
        {"start_day": 0, "threshold": original.threshold, "losses": []}
    ]
    events: list[dict[str, Any]] = []
    full_flops = float(prepared.exit_flops[-1])
    for day in progress_bar(range(config.days), enabled=config.progress, desc="serving days"):
        images, labels = _day_images(prepared, config, day, severities[day])
        served = monitored.full_model() if fallback else monitored
        audited = audited_infer(
            network,
            images,
            served,
            audit=config.audit,
            rng=audit_rng,
            exit_flops=prepared.exit_flops,
        )
        every = collect(network, images)  # the figure's ground truth, not part of serving
        predictions = every.probs.argmax(-1)  # (N, L)
        if not fallback:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RiskAlarmWarning)
                status = monitor.update(audited.losses)
            segments[-1]["losses"].extend(audited.losses.tolist())
            if status.alarm:
                fallback = True
                events.append(
                    {
                        "day": day,
                        "event": "alarm",
                        "reason": status.reason,
                        "audit": status.alarm_at,
                    }
                )
        else:
            pending.append(audited.exit_probs)
            collected = np.concatenate(pending)
            if len(collected) >= window:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    candidate = recalibrate(
                        collected, policy=original, window=window, seed=config.seed + day
                    )
                if candidate.certified:
                    monitored = network.bind_policy(candidate)
                    monitor.reset(monitored)
                    fallback, pending = False, []
                    events.append(
                        {
                            "day": day,
                            "event": "recalibrated",
                            "threshold": monitored.threshold,
                            "audits": window,
                        }
                    )
                    segments.append(
                        {"start_day": day + 1, "threshold": monitored.threshold, "losses": []}
                    )
        served_exits = audited.result.exits.numpy()
        days.append(
            {
                "day": day,
                "severity": float(severities[day]),
                "served": "full model" if served.is_full_model else "policy",
                "threshold": None if served.is_full_model else float(served.threshold),
                "risk_served": _true_risk(served, every.confidences, predictions),
                "risk_original": _true_risk(original, every.confidences, predictions),
                "flops_saved": 1.0 - float(prepared.exit_flops[served_exits].mean()) / full_flops,
                "audits": int(audited.audited.sum()),
                "audit_overhead": audited.overhead,
                "accuracy_full_model": float(np.mean(predictions[:, -1] == labels)),
            }
        )
    for segment in segments:
        losses = np.asarray(segment.pop("losses"))
        segment["audits"] = int(losses.size)
        if losses.size:
            trajectory = monitor_stats.statistics(
                losses,
                target_risk=config.target_risk,
                alpha=config.alpha,
                loss_min=0.0,
                loss_max=1.0,
            )
            segment.update(
                {
                    "log10_wealth": (trajectory["log_wealth"] / math.log(10)).tolist(),
                    "log10_detector": (trajectory["log_cusum"] / math.log(10)).tolist(),
                    "risk_low": trajectory["risk_low"].tolist(),
                    "risk_high": trajectory["risk_high"].tolist(),
                }
            )
    return {
        "days": days,
        "events": events,
        "segments": segments,
        "needed": needed,
        "window": window,
    }


def run_demo(
    config: DemoConfig, *, log: Callable[[str], None] = print, stream_defaults: bool = True
) -> DriftResults:
    """Serve the drifting stream with audits and the monitor; write the report.

    Beside the report it saves the policy certified on clean images (``policy.json``).

    With ``quick`` (and ``stream_defaults``), a shorter stream with more audits per day
    replaces the configured one.
    """
    if config.quick and stream_defaults:  # a shorter stream with more audits per day
        config = dataclasses.replace(
            config,
            days=16,
            per_day=400,
            clean_days=5,
            ramp_days=3,
            audit=0.1,
            recalibration_window=200,
        )
    prepared = prepare(config, log=log)
    policy = prepared.policy
    log(
        f"policy: ucb-wsr, prediction_consistency, ε = {config.target_risk:g}, threshold "
        f"{policy.threshold:.3g}, certified {policy.certified}"
    )
    served = serve(prepared, config)
    days, events = served["days"], served["events"]
    alarm = next((e for e in events if e["event"] == "alarm"), None)
    recal = next((e for e in events if e["event"] == "recalibrated"), None)
    clean = [d["risk_original"] for d in days if d["severity"] == 0]
    clean_risk = float(np.mean(clean)) if clean else float("nan")
    # A day's risk estimate has a standard error of about sqrt(eps (1 - eps) / per_day).
    noise = 3 * math.sqrt(config.target_risk * (1 - config.target_risk) / config.per_day)
    first_bad = next(
        (d["day"] for d in days if d["risk_original"] > config.target_risk + noise), None
    )
    overhead = float(np.mean([d["audit_overhead"] for d in days]))
    summary = [
        (
            f"{config.days} days of {config.per_day} {prepared.classifier.data.name} images; "
            f"from day {config.clean_days} the images are rotated by up to "
            f"{60 * config.max_severity:g} degrees ({config.corruption}); "
            f"{100 * config.audit:g}% of the samples are audited."
        )
        if config.corruption == "rotation"
        else (
            f"{config.days} days of {config.per_day} images, {config.corruption} from day "
            f"{config.clean_days}; {100 * config.audit:g}% audited."
        ),
        (
            f"The policy certified on clean images (threshold {policy.threshold:.3g}) had a "
            f"mean daily risk of {clean_risk:.3f} on clean days (ε = {config.target_risk:g}); "
            + (
                "the drift first pushed it clearly above ε (by more than 3 standard errors of "
                f"a day) on day {first_bad}."
                if first_bad is not None
                else "the drift never pushed it clearly above ε."
            )
        ),
        (
            f"The monitor alarmed on day {alarm['day']} ({alarm['reason']}, audit "
            f"{alarm['audit']}); the service fell back to the full model."
            if alarm
            else "The monitor raised no alarm."
        ),
        (
            f"A policy recalibrated on the last {recal['audits']} audits (threshold "
            f"{recal['threshold']:.3g}) was certified on day {recal['day']} and served from "
            f"day {recal['day'] + 1} (days are counted from 0)."
            if recal
            else "No recalibrated policy could be certified before the stream ended."
        ),
        f"Audits cost {100 * overhead:.1f}% of the served compute on average.",
    ]
    results = DriftResults(
        title="exitguard: keeping a certified policy safe under drift",
        summary=tuple(summary),
        settings=dataclasses.asdict(config),
        days=tuple(DriftDay(**day) for day in served["days"]),
        events=tuple(DriftEvent(**event) for event in served["events"]),
        segments=tuple(
            MonitorSegment(**{k: tuple(v) if isinstance(v, list) else v for k, v in seg.items()})
            for seg in served["segments"]
        ),
        samples_needed=served["needed"],
        recalibration_window=served["window"],
        policy=policy.to_dict(),
        **results_header(),
    )
    write_demo_report(results, config, policy=policy, log=log)
    return results
