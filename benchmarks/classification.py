"""Savings of certified policies on image classification, in layers, FLOPs and wall-clock time.

For every risk, procedure (CRC, UCB-WSR) and calibration size: the mean exit and FLOPs saving
over repeated random splits (with the test risk and violation rate). Then one policy (the
UCB-WSR prediction-gap policy at the target risk, calibrated on a random split) is run for
real on the rest of the held-out data, for the network as trained, with BatchNorm folded,
and folded and channels-last, at batch 1 and 256: FLOPs, predicted (latency profile) and
measured speed-ups side by side, the policy and the full model timed interleaved.

    python benchmarks/classification.py --dataset fashion-mnist --n-cal 100 1000
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

import exitguard
from exitguard.risk.losses import RISKS
from exitguard.tasks.classification import DemoConfig, prepare, risk_tables
from exitguard.tasks.common import machine_info

sys.path.insert(0, str(Path(__file__).parent))
from _cli import certification_options, results_path
from _speed import speed_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 256])
    certification_options(parser, n_cal=[100, 1000], target_risk=0.05)
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
        f"{'layers saved':>13}{'FLOPs saved':>12}"
    )
    print(
        f"{args.dataset}: {n_exits} exits, eps = {args.target_risk}, delta = {args.delta}, "
        f"{args.trials} splits, {args.threads} threads"
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
            for procedure in ("crc", "ucb-wsr"):
                flops_row = by_flops.row(procedure, args.target_risk)
                exit_row = by_exit.row(procedure, args.target_risk)
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
                }
                rows.append(row)
                print(
                    f"{risk:<26}{procedure:<9}{n_cal:>6}{row['mean_test_risk']:>10.4f}"
                    f"{row['violation_rate']:>7.2f}{row['mean_exit']:>10.2f}"
                    f"{100 * row['layer_saving']:>12.1f}%{100 * row['flops_saving']:>11.1f}%"
                )

    # One certified policy run for real: the UCB-WSR prediction-gap policy.
    tables = risk_tables(prepared, "prediction_gap", seed=args.seed)
    n_cal = args.n_cal[0]
    order = np.random.default_rng(args.seed + 1).permutation(len(heldout))
    cal, test = order[:n_cal], order[n_cal:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        policy = exitguard.calibrate_table(
            tables["losses"][:, cal],
            target_risk=args.target_risk,
            delta=args.delta,
            procedure="ucb-wsr",
            loss_bound=1.0,
            thresholds=tables["thresholds"],
            seed=args.seed,
        )
    threshold = float(policy.threshold) if policy.threshold is not None else math.inf
    print(
        f"\nprediction-gap policy, UCB-WSR, eps = {args.target_risk}, n_cal = {n_cal}: "
        f"threshold {threshold:.4g}, certified {policy.certified}, "
        f"{len(test)} test images"
    )
    speed = speed_rows(
        network, images[test], threshold, batch_sizes=tuple(args.batch_size), repeats=args.repeats
    )
    out = results_path(args.out, f"classification-{args.dataset}")
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
        "timed_policy": {"threshold": threshold, "n_cal": n_cal, "procedure": "ucb-wsr"},
        "speed": speed,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
