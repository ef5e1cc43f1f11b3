"""Savings of certified early-exit diffusion sampling, in FLOPs and samples per second.

A U-ViT denoiser with DeeDiff exits and uncertainty modules is trained (or loaded from the
cache), N noise seeds are sampled under every threshold of a pilot-chosen grid, and for
UCB-WSR (and CRC) at each target risk: the test risk, violation rates and FLOPs saving over
repeated random calibration/test splits, then the samples per second of the policy calibrated
on one split against the full model, both sampling the same test seeds at the same batch
size, timed side by side in this run (interleaved repeats, medians after a warm-up).

    python benchmarks/diffusion.py --dataset digits
    python benchmarks/diffusion.py --tiny --out /tmp/diffusion.json     # a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import exitguard
from exitguard.tasks.common import machine_info
from exitguard.tasks.diffusion.demo import DemoConfig, calibrated, prepare
from exitguard.tasks.diffusion.losses import ssim_loss
from exitguard.tasks.diffusion.model import DenoiserConfig
from exitguard.tasks.diffusion.sample import SampleResult, generate, to_unit
from exitguard.tasks.diffusion.sweep import write_table
from exitguard.tasks.diffusion.train import TrainSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--n-samples", type=int, default=1000)
    parser.add_argument("--n-cal", type=int, default=500)
    parser.add_argument(
        "--target-risk", type=float, nargs="+", default=[0.005, 0.01, 0.02, 0.05, 0.1]
    )
    parser.add_argument("--procedure", nargs="+", default=["ucb-wsr", "crc"])
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument(
        "--losses", nargs="+", choices=("ssim", "features"), default=["ssim", "features"]
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--timing-samples", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-thresholds", type=int, default=20, help="size of the grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a tiny model and table (smoke run)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--table", default=None, help="also write the loss table (npz) here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tiny: dict[str, object] = {}
    if args.tiny:
        tiny = {
            "model": DenoiserConfig(width=32, depth=5, n_heads=2, steps=12, reference_steps=120),
            "train": TrainSettings(iterations=40, batch_size=32, warmup=5, seed=args.seed),
            "pilot_samples": 8,
        }
        args.n_samples, args.n_cal, args.trials, args.n_thresholds = 40, 20, 5, 8
        args.timing_samples, args.batch_size, args.repeats = 16, 8, 1
    config = DemoConfig(
        dataset=args.dataset,
        seed=args.seed,
        n_cal=args.n_cal,
        n_samples=args.n_samples,
        trials=args.trials,
        delta=args.delta,
        losses=tuple(args.losses),
        policy_loss=args.losses[0],
        batch_size=args.batch_size,
        n_thresholds=args.n_thresholds,
        progress=False,
        **tiny,  # type: ignore[arg-type]
    )
    prepared = prepare(config)
    model, table = prepared.model, prepared.sweep
    if args.table:
        write_table(table, args.table, loss=args.losses[0])
    n_cal, n_total = prepared.n_cal, table.indices.size
    steps = model.config.steps
    full_flops = float(table.flops["full"]) * steps
    step_flops = np.asarray(table.flops["to_exit"], dtype=np.float64)

    order = np.random.default_rng(args.seed + 1).permutation(n_total)
    cal, test = np.sort(order[:n_cal]), np.sort(order[n_cal:])
    timed = test[: min(args.timing_samples, test.size)]
    policies = {
        (loss, procedure, eps): calibrated(
            prepared, cal, loss=loss, target_risk=eps, delta=args.delta, procedure=procedure
        )
        for loss in args.losses
        for procedure in args.procedure
        for eps in args.target_risk
    }
    thresholds = sorted(
        {math.inf if p.threshold is None else float(p.threshold) for p in policies.values()}
        | {math.inf},
        reverse=True,
    )

    def run(threshold: float) -> SampleResult:
        return generate(
            model,
            timed,
            seed=args.seed,
            threshold=threshold,
            earliest_exit=config.earliest_exit,
            batch_size=args.batch_size,
        )

    # Interleaved repeats: every threshold is timed once per round, after a warm-up round.
    seconds: dict[float, list[float]] = {value: [] for value in thresholds}
    outputs = {value: run(value) for value in thresholds}
    for _ in range(args.repeats):
        for value in thresholds:
            start = time.perf_counter()
            run(value)
            seconds[value].append(time.perf_counter() - start)
    rate = {value: len(timed) / statistics.median(seconds[value]) for value in thresholds}
    full_images = to_unit(outputs[math.inf].images)

    common = dict(
        procedures=tuple(args.procedure),
        target_risks=tuple(args.target_risk),
        delta=args.delta,
        n_cal=n_cal,
        trials=args.trials,
        loss_bound=1.0,
        seed=args.seed,
    )
    print(
        f"{args.dataset}: {model.n_exits} exits, T = {steps}, {n_total} samples x "
        f"{table.thresholds.size} thresholds ({table.seconds:.0f} s), delta = {args.delta}, "
        f"n_cal = {n_cal}, {args.trials} splits; timed on {len(timed)} test samples at batch "
        f"{args.batch_size}, {args.threads} thread(s)"
    )
    header = (
        f"{'loss':<9}{'proc.':<9}{'eps':>6}{'test risk':>11}{'viol.':>7}{'pop.viol':>9}"
        f"{'p':>7}{'mean exit':>10}{'FLOPs saved':>12}{'threshold':>11}{'full/s':>8}"
        f"{'early/s':>9}{'speed-up':>9}{'ideal':>7}{'ssim':>8}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for loss in args.losses:  # a loop over the few losses
        losses = table.table(loss)
        by_flops = exitguard.evaluate(losses, cost=table.cost, **common)  # type: ignore[arg-type]
        by_exit = exitguard.evaluate(
            losses,
            cost=table.mean_exit,  # the mean exit is 0-based
            **common,  # type: ignore[arg-type]
        )
        for procedure in args.procedure:
            for eps in args.target_risk:
                policy = policies[(loss, procedure, eps)]
                flops_row = by_flops.row(procedure, eps)
                exit_row = by_exit.row(procedure, eps)
                value = math.inf if policy.threshold is None else float(policy.threshold)
                early = outputs[value]
                exits = early.exits.numpy()  # (S, T)
                cost = full_flops if math.isinf(value) else float(step_flops[exits].sum(1).mean())
                timed_risk = float(ssim_loss(to_unit(early.images), full_images).mean())
                row = {
                    "loss": loss,
                    "procedure": procedure,
                    "target_risk": eps,
                    "mean_test_risk": flops_row.mean_test_risk,
                    "sd_test_risk": flops_row.sd_test_risk,
                    "violation_rate": flops_row.violation_rate,
                    "population_violation_rate": flops_row.population_violation_rate,
                    "violation_p_value": flops_row.violation_p_value,
                    "certified_rate": flops_row.certified_rate,
                    "mean_exit": exit_row.mean_cost,
                    "flops_saving": flops_row.relative_saving,
                    "timed_threshold": None if math.isinf(value) else value,
                    "timed_certified": policy.certified,
                    "timed_mean_exit": float(exits.mean()),
                    "timed_flops_saving": 1.0 - cost / full_flops,
                    "timed_ssim_loss": timed_risk,
                    "full_samples_per_second": rate[math.inf],
                    "early_exit_samples_per_second": rate[value],
                    "measured_speedup": rate[value] / rate[math.inf],
                    "flops_speedup": full_flops / cost,
                }
                rows.append(row)
                p_value = row["violation_p_value"]
                print(
                    f"{loss:<9}{procedure:<9}{eps:>6.3f}{row['mean_test_risk']:>11.5f}"
                    f"{row['violation_rate']:>7.2f}{row['population_violation_rate']:>9.2f}"
                    f"{'-' if p_value is None else f'{p_value:.2f}':>7}{row['mean_exit']:>10.2f}"
                    f"{100 * (row['flops_saving'] or 0):>11.1f}%"
                    f"{'never' if math.isinf(value) else f'{value:.4f}':>11}"
                    f"{rate[math.inf]:>8.1f}{rate[value]:>9.1f}{row['measured_speedup']:>8.2f}x"
                    f"{row['flops_speedup']:>6.2f}x{timed_risk:>8.4f}"
                )
    name = "diffusion.json" if args.dataset == "digits" else f"diffusion-{args.dataset}.json"
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "dataset": args.dataset,
        "losses": args.losses,
        "n_exits": model.n_exits,
        "steps": steps,
        "model": dataclasses.asdict(model.config),
        "train": dataclasses.asdict(prepared.settings),
        "train_seconds": prepared.trained.metadata.get("train_seconds"),
        "flops": table.flops,
        "thresholds": ["never" if math.isinf(v) else float(v) for v in table.thresholds],
        "mean_loss_per_threshold": {
            loss: table.table(loss).mean(axis=1).tolist() for loss in args.losses
        },
        "flops_saving_per_threshold": (1.0 - table.cost.mean(axis=1) / full_flops).tolist(),
        "n_samples": n_total,
        "n_cal": n_cal,
        "trials": args.trials,
        "delta": args.delta,
        "batch_size": args.batch_size,
        "timing_samples": len(timed),
        "repeats": args.repeats,
        "sweep_seconds": table.seconds,
        "machine": machine_info(),
        "rows": rows,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
