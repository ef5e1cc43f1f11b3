"""Savings of certified policies on image classification, in layers, FLOPs and wall-clock time.

For every risk, procedure (CRC, UCB-WSR) and calibration size: the mean exit and FLOPs saving
over repeated random splits (with the test risk and violation rate), and the measured speed-up
of one calibrated policy run for real against the full model on the rest of the held-out data
(median of repeated runs after a warm-up, both measured side by side in this run).

    python benchmarks/classification.py --dataset fashion-mnist --n-cal 100 1000
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch

import exitguard
from exitguard.risk.losses import RISKS
from exitguard.tasks.classification import DemoConfig, prepare, risk_tables, time_inference
from exitguard.tasks.common import machine_info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--n-cal", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--target-risk", type=float, default=0.05)
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    prepared = prepare(DemoConfig(dataset=args.dataset, seed=args.seed))
    network, heldout = prepared.network, prepared.heldout
    images = torch.from_numpy(heldout.images)
    n_exits = network.n_exits
    full_flops = float(prepared.flops.full)
    rows = []
    # mean exit: 0-based
    header = (
        f"{'risk':<26}{'proc.':<9}{'n_cal':>6}{'test risk':>10}{'viol.':>7}{'mean exit':>10}"
        f"{'layers saved':>13}{'FLOPs saved':>12}{'speed-up':>9}{'ideal':>7}"
    )
    print(
        f"{args.dataset}: {n_exits} exits, eps = {args.target_risk}, delta = {args.delta}, "
        f"{args.trials} splits; speed-up measured at batch {args.batch_size}, "
        f"{args.threads} threads"
    )
    print(header)
    print("-" * len(header))
    for risk in RISKS:
        tables = risk_tables(prepared, risk, seed=args.seed)
        bound = 2.0 if risk.startswith("distribution") else 1.0
        for n_cal in args.n_cal:
            common = dict(
                procedures=("crc", "ucb-wsr"),
                target_risks=(args.target_risk,),
                delta=args.delta,
                n_cal=n_cal,
                trials=args.trials,
                loss_bound=bound,
                seed=args.seed,
            )
            by_flops = exitguard.evaluate(tables["losses"], cost=tables["cost"], **common)
            by_exit = exitguard.evaluate(tables["losses"], cost=tables["exits"] * 1.0, **common)
            order = np.random.default_rng(args.seed + 1).permutation(len(heldout))
            cal, test = order[:n_cal], order[n_cal:]
            for procedure in ("crc", "ucb-wsr"):
                flops_row = by_flops.row(procedure, args.target_risk)
                exit_row = by_exit.row(procedure, args.target_risk)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    policy = exitguard.calibrate_table(
                        tables["losses"][:, cal],
                        target_risk=args.target_risk,
                        delta=args.delta,
                        procedure=procedure,
                        loss_bound=bound,
                        thresholds=tables["thresholds"],
                    )
                threshold = float(policy.threshold) if policy.threshold is not None else math.inf
                timing = time_inference(
                    network,
                    images[test],
                    threshold,
                    batch_size=args.batch_size,
                    repeats=args.repeats,
                )
                taken = tables["exits"][policy.index, test]
                ideal = full_flops / float(np.mean(tables["cost"][policy.index, test]))
                row = {
                    "risk": risk,
                    "procedure": procedure,
                    "n_cal": n_cal,
                    "target_risk": args.target_risk,
                    "mean_test_risk": flops_row.mean_test_risk,
                    "violation_rate": flops_row.violation_rate,
                    "population_violation_rate": flops_row.population_violation_rate,
                    "mean_exit": exit_row.mean_cost,
                    "layer_saving": 1.0 - (exit_row.mean_cost + 1.0) / n_exits,
                    "flops_saving": flops_row.relative_saving,
                    "timed_threshold": threshold,
                    "timed_mean_exit": float(taken.mean()),
                    "timed_flops_speedup": ideal,
                    **timing,
                }
                rows.append(row)
                print(
                    f"{risk:<26}{procedure:<9}{n_cal:>6}{row['mean_test_risk']:>10.4f}"
                    f"{row['violation_rate']:>7.2f}{row['mean_exit']:>10.2f}"
                    f"{100 * row['layer_saving']:>12.1f}%{100 * row['flops_saving']:>11.1f}%"
                    f"{timing['measured_speedup']:>8.2f}x{ideal:>6.2f}x"
                )
    out = (
        Path(args.out)
        if args.out
        else (Path(__file__).parent / "results" / f"classification-{args.dataset}.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "dataset": args.dataset,
        "n_exits": n_exits,
        "accuracy_per_exit": (prepared.outputs.probs.argmax(-1) == heldout.labels[:, None])
        .mean(axis=0)
        .tolist(),
        "flops_per_exit": prepared.exit_flops.tolist(),
        "full_flops": full_flops,
        "machine": machine_info(),
        "rows": rows,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
