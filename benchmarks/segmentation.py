"""Savings of certified image-level exits on segmentation, in the shape of the paper's Table 1.

For every confidence x aggregation: UCB-WSR on the miscoverage risk R^C(ŷ) at each target
risk, with the share of layers and of FLOPs saved and the test risk over repeated random
splits; then the four risks with top-1 + mean; then one calibrated policy run for real against
the full model at batch 1 and 64, for the network as trained, with BatchNorm folded, and folded
and channels-last: FLOPs, predicted (latency profile) and measured speed-ups side by side, the
policy and the full model timed interleaved in this run.

    python benchmarks/segmentation.py --dataset fashion-mnist --n-cal 400
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
from exitguard.tasks.common import machine_info

sys.path.insert(0, str(Path(__file__).parent))
from _cli import certification_options, results_path
from _speed import speed_rows

from exitguard.tasks.segmentation import (
    LOSS_BOUNDS,
    RISK_TITLES,
    SEGMENTATION_RISKS,
    DemoConfig,
    prepare,
    table_one,
)


def _cells(
    by_flops: exitguard.Evaluation, by_exit: exitguard.Evaluation, eps: float, n_exits: int
) -> dict:
    row = by_flops.row("ucb-wsr", eps)
    mean_exit = by_exit.row("ucb-wsr", eps).mean_cost  # 0-based
    return {
        "layer_saving": 1.0 - (mean_exit + 1.0) / n_exits,
        "flops_saving": row.relative_saving,
        "mean_test_risk": row.mean_test_risk,
        "violation_rate": row.violation_rate,
        "population_violation_rate": row.population_violation_rate,
    }


def _print_row(name: str, cells: list[dict]) -> None:
    text = "".join(
        f"{100 * c['layer_saving']:>8.1f}%{100 * c['flops_saving']:>7.1f}%"
        f"{c['mean_test_risk']:>8.4f}{c['population_violation_rate']:>6.2f}"
        for c in cells
    )
    print(f"{name:<34}{text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    certification_options(parser, n_cal=400, target_risk=[0.01, 0.05, 0.1])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    prepared = prepare(DemoConfig(dataset=args.dataset, seed=args.seed, progress=False))
    heldout, network = prepared.heldout, prepared.network
    common = dict(delta=args.delta, n_cal=args.n_cal, trials=args.trials, seed=args.seed)
    eps_list = list(args.target_risk)
    print(
        f"{heldout.name}: {len(heldout)} held-out scenes, {network.n_exits} exits, UCB-WSR, "
        f"delta = {args.delta}, n_cal = {args.n_cal}, {args.trials} splits"
    )
    head = "".join(
        f"{'ε=' + format(e, 'g'):>10}{'FLOPs':>7}{'risk':>8}{'viol':>6}" for e in eps_list
    )
    print(f"{'miscoverage: confidence/aggregation':<34}{head}")
    measures = {}
    for name, evaluations in table_one(prepared, target_risks=eps_list, **common).items():
        cells = [
            _cells(evaluations["flops"], evaluations["exits"], e, network.n_exits)
            for e in eps_list
        ]
        measures[name] = dict(zip(map(str, eps_list), cells, strict=True))
        _print_row(name, cells)
    print(f"\n{'risk (top-1 + mean)':<34}{head}")
    risks = {}
    for risk in SEGMENTATION_RISKS:
        evaluations = table_one(prepared, risk=risk, target_risks=eps_list, **common)[
            prepared.measures[0].__name__
        ]
        cells = [
            _cells(evaluations["flops"], evaluations["exits"], e, network.n_exits)
            for e in eps_list
        ]
        risks[risk] = dict(zip(map(str, eps_list), cells, strict=True))
        _print_row(RISK_TITLES[risk], cells)

    # One calibrated policy (miscoverage, top-1 + mean, ε = 0.05) run for real.
    eps = 0.05 if 0.05 in eps_list else eps_list[0]
    tables = prepared.tables("prediction_consistency")
    order = np.random.default_rng(args.seed + 1).permutation(len(heldout))
    cal, test = order[: args.n_cal], order[args.n_cal :]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        policy = exitguard.calibrate_table(
            tables["losses"][:, cal],
            target_risk=eps,
            delta=args.delta,
            procedure="ucb-wsr",
            loss_bound=LOSS_BOUNDS["prediction_consistency"],
            thresholds=tables["thresholds"],
            seed=args.seed,  # the reading order of the WSR bound: the same policy every run
        )
    threshold = math.inf if policy.threshold is None else float(policy.threshold)
    network.confidence = prepared.measures[0]
    images = torch.from_numpy(heldout.images[test])
    print(
        f"\npolicy at ε = {eps:g}: threshold {threshold:.4g}, mean exit (0-based) "
        f"{tables['exits'][policy.index, test].mean():.2f}, {len(test)} test scenes"
    )
    speed = speed_rows(network, images, threshold, batch_sizes=(1, 64), repeats=args.repeats)
    out = results_path(args.out, f"segmentation-{args.dataset}")
    report = {
        "dataset": heldout.name,
        "n_heldout": len(heldout),
        "n_exits": network.n_exits,
        "miou_per_exit": prepared.outputs.miou.mean(axis=0).tolist(),
        "pixel_accuracy_per_exit": prepared.outputs.pixel_accuracy.mean(axis=0).tolist(),
        "flops_per_exit": prepared.exit_flops.tolist(),
        "full_flops": float(prepared.flops.full),
        "settings": {**common, "target_risks": eps_list, "procedure": "ucb-wsr"},
        "machine": machine_info(),
        "miscoverage_by_measure": measures,
        "risks_top1_mean": risks,
        "timed_policy": {"target_risk": eps, "threshold": threshold, "procedure": "ucb-wsr"},
        "speed": speed,
    }
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
