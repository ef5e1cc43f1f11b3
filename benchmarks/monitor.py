"""How fast the risk monitor finds drift, how rarely it cries wolf, and what audits cost.

The deployed policy: UCB-WSR at epsilon = 0.1 on the consistency risk of the digits
classifier (the drift demo's), calibrated on 400 clean held-out images. Its per-sample losses
(disagreement with the full model) are computed once on the 898 held-out images, clean and
rotated at growing severities; a stream serves images drawn uniformly from them, and each
served image is audited with probability rho (an independent coin flip).

* False alarms: 500 streams without drift of 200,000 served images each, (a) Bernoulli(eps)
  losses (the boundary of "risk <= eps", the hardest case), (b) the real clean losses
  (population risk below eps). Rates are compared with alpha by a one-sided binomial test.
* Detection delay: 200 streams per setting; 20,000 clean served images, then images rotated
  at severity s; the delay (served images after the change until the alarm, and audits) of
  the e-process (alarm at 1/alpha) and of the e-CUSUM detector (ARL 10^5 audits), for
  rho in {1%, 2%, 5%, 10%}.
* Audit overhead: the audited share runs the full model with every head; its FLOPs relative
  to the served (early-exit) FLOPs.

Writes benchmarks/results/monitor.json.

    python benchmarks/monitor.py [--streams 500] [--delay-streams 200]
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from exitguard import calibrate
from exitguard.nn import collect
from exitguard.risk import monitor as m
from exitguard.risk.exits import exit_index
from exitguard.tasks import classification
from exitguard.tasks.drift.corrupt import corrupt

EPS, ALPHA, ARL = 0.1, 0.05, 1e5
RATES = (0.01, 0.02, 0.05, 0.10)
SEVERITIES = (0.15, 0.25, 0.4)


def policy_losses(seed: int = 0):  # type: ignore[no-untyped-def]
    prepared = classification.prepare(classification.DemoConfig(progress=False), log=lambda _: None)
    network, heldout = prepared.network, prepared.heldout
    order = np.random.default_rng(seed + 2).permutation(len(heldout))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        policy = calibrate(
            prepared.outputs.probs[order[:400]],
            risk="prediction_consistency",
            target_risk=EPS,
            procedure="ucb-wsr",
            seed=seed,
        )
    images = torch.from_numpy(heldout.images)
    losses, flops = {}, {}
    for severity in (0.0, *SEVERITIES):
        x = corrupt(images, "rotation", severity, generator=torch.Generator().manual_seed(seed))
        outputs = collect(network, x)
        exits = exit_index(outputs.confidences, float(policy.threshold))
        predictions = outputs.probs.argmax(-1)
        rows = np.arange(len(exits))
        losses[severity] = (predictions[rows, exits] != predictions[:, -1]).astype(float)
        flops[severity] = float(prepared.exit_flops[exits].mean())
    return policy, losses, flops, prepared.exit_flops


def first_crossing(log_statistic: np.ndarray, threshold: float) -> np.ndarray:
    """Index of the first audit at which each stream crosses (len when never)."""
    hit = log_statistic >= math.log(threshold)
    return np.where(hit.any(-1), hit.argmax(-1), log_statistic.shape[-1])


def false_alarms(streams: int, n_served: int, rho: float, sampler, rng) -> dict[str, float]:  # type: ignore[no-untyped-def]
    n_audits = int(n_served * rho * 1.2) + 100
    counts = rng.binomial(n_served, rho, size=streams)  # audits per stream
    losses = sampler((streams, n_audits))
    out = m.statistics(losses, target_risk=EPS, alpha=ALPHA, loss_min=0.0, loss_max=1.0)
    alive = np.arange(n_audits)[None, :] < counts[:, None]
    wealth = np.where(alive, out["log_wealth"], -np.inf)
    detector = np.where(alive, out["log_cusum"], -np.inf)
    horizon = m.detector_threshold(horizon=int(n_served * rho * 1.2) + 100, alpha=ALPHA)
    result = {}
    for name, series, threshold in (
        ("e-process", wealth, 1 / ALPHA),
        ("e-CUSUM (ARL 1e5)", detector, ARL),
        ("e-CUSUM (horizon)", detector, horizon),
    ):
        k = int(np.sum(series.max(-1) >= math.log(threshold)))
        result[name] = {
            "false_alarms": k,
            "rate": k / streams,
            "binomial_p": float(stats.binomtest(k, streams, ALPHA, alternative="greater").pvalue),
        }
    return result


def delays(
    clean: np.ndarray, drifted: np.ndarray, rho: float, streams: int, rng: np.random.Generator
) -> dict[str, dict[str, float]]:
    """Delay after a change at 20,000 served images, in served images and audits."""
    before, after_served = 20_000, 400_000
    pre = rng.binomial(before, rho, size=streams)
    post_audits = int(after_served * rho) + 50
    n = int(pre.max()) + post_audits
    losses = np.empty((streams, n))
    for s in range(streams):  # a loop over streams: each has its own number of clean audits
        losses[s, : pre[s]] = rng.choice(clean, pre[s])
        losses[s, pre[s] :] = rng.choice(drifted, n - pre[s])
    out = m.statistics(losses, target_risk=EPS, alpha=ALPHA, loss_min=0.0, loss_max=1.0)
    result = {}
    for name, key, threshold in (
        ("e-process", "log_wealth", 1 / ALPHA),
        ("e-CUSUM (ARL 1e5)", "log_cusum", ARL),
    ):
        cross = first_crossing(out[key], threshold)
        early = cross < pre  # alarms before the change (false alarms during the good period)
        found = (cross < n) & ~early
        audits_after = (cross - pre)[found]
        result[name] = {
            "found": float(found.mean()),
            "alarm_before_change": float(early.mean()),
            "median_audits": float(np.median(audits_after)) if found.any() else None,
            "median_served": float(np.median(audits_after) / rho) if found.any() else None,
            "p90_served": float(np.quantile(audits_after, 0.9) / rho) if found.any() else None,
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--delay-streams", type=int, default=200)
    parser.add_argument("--served", type=int, default=200_000)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "monitor.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    policy, losses, flops, exit_flops = policy_losses()
    clean = losses[0.0]
    print(
        f"policy: threshold {policy.threshold:.3g}, certified {policy.certified}; population "
        f"risk clean {clean.mean():.4f}, "
        + ", ".join(f"rotated {s:g}: {losses[s].mean():.4f}" for s in SEVERITIES)
    )
    report: dict[str, object] = {
        "epsilon": EPS,
        "alpha": ALPHA,
        "arl": ARL,
        "policy_threshold": policy.threshold,
        "population_risk": {str(k): float(v.mean()) for k, v in losses.items()},
    }

    print(
        f"\nfalse alarms over {args.streams} streams of {args.served} served images "
        f"(alpha = {ALPHA})"
    )
    print(f"{'losses':<22}{'rho':>6}{'e-process':>18}{'e-CUSUM ARL':>18}{'e-CUSUM horizon':>18}")
    alarms = []
    for label, sampler in (
        ("Bernoulli(eps)", lambda shape: (rng.random(shape) < EPS).astype(float)),
        ("real, clean", lambda shape: rng.choice(clean, shape)),
    ):
        for rho in (0.02, 0.10):
            result = false_alarms(args.streams, args.served, rho, sampler, rng)
            alarms.append({"losses": label, "rho": rho, **result})
            cells = [f"{r['rate']:.3f} (p={r['binomial_p']:.2f})" for r in result.values()]
            print(f"{label:<22}{rho:>6.2f}" + "".join(f"{c:>18}" for c in cells))
    report["false_alarms"] = alarms

    print(f"\ndetection after 20000 clean served images ({args.delay_streams} streams each)")
    print(
        f"{'severity':<10}{'risk':>7}{'rho':>6}{'e-process median (p90) served':>34}"
        f"{'e-CUSUM median (p90) served':>32}"
    )
    detection = []
    for severity in SEVERITIES:
        for rho in RATES:
            result = delays(clean, losses[severity], rho, args.delay_streams, rng)
            detection.append(
                {"severity": severity, "risk": float(losses[severity].mean()), "rho": rho, **result}
            )
            cells = []
            for r in result.values():
                if r["median_served"] is None:
                    cells.append("never")
                else:
                    cells.append(
                        f"{r['median_served']:.0f} ({r['p90_served']:.0f}), found {r['found']:.2f}"
                    )
            print(
                f"{severity:<10}{losses[severity].mean():>7.3f}{rho:>6.2f}"
                + "".join(f"{c:>33}" for c in cells)
            )
    report["detection"] = detection

    full_all_heads = float(exit_flops[-1])
    served = flops[0.0]
    overhead = {str(rho): rho * full_all_heads / served for rho in RATES}
    print(
        "\naudit overhead (FLOPs of the audits / FLOPs served, clean stream): "
        + ", ".join(f"rho {rho:g}: {100 * overhead[str(rho)]:.1f}%" for rho in RATES)
        + f" (the policy serves {100 * (1 - served / full_all_heads):.1f}% below the full model)"
    )
    report["audit_overhead"] = overhead
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
