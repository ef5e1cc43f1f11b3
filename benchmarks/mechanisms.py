"""Early-exit mechanisms side by side on Fashion-MNIST, certified at the same (eps, delta, n).

For each mechanism (branch exits, cascade, learned halting, anytime budgets, layer skipping),
each risk (prediction gap, consistency) and each calibration size: the configuration that
UCB-WSR certifies on one calibration split with its upper bound and test risk; the mean test
risk, violation rates (binomial test) and FLOPs saved over repeated random splits; and the
measured speed-up of the certified configuration over the mechanism's full model at batch 1
and 256, both timed side by side in this run.

Train and cache the models under the shared lock, then time on a quiet machine:

    flock -s /tmp/exitguard-cpu.lock python benchmarks/mechanisms.py --prepare-only
    flock /tmp/exitguard-cpu.lock python benchmarks/mechanisms.py

Without the Debian package ``dataset-fashion-mnist`` it says so and runs on mnist-5k.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from exitguard.data.images import DatasetNotFoundError, load_dataset
from exitguard.tasks.common import machine_info
from exitguard.tasks.mechanisms.demo import DemoConfig, build_mechanisms, compare_mechanisms

sys.path.insert(0, str(Path(__file__).parent))
from _cli import certification_options, results_path

COLUMNS = (
    ("mechanism", 16, "{}"),
    ("certified", 5, "{}"),
    ("certified_risk", 8, "{:.4f}"),
    ("test_risk", 8, "{:.4f}"),
    ("mean_test_risk", 8, "{:.4f}"),
    ("population_violation_rate", 6, "{:.2f}"),
    ("violation_p_value", 7, "{:.3f}"),
    ("mean_flops_saved", 7, "{:.1%}"),
    ("speedup_batch_1", 6, "{:.2f}"),
    ("speedup_batch_256", 6, "{:.2f}"),
)
HEADER = ("mechanism", "cert.", "UCB", "test", "mean", "viol.", "p", "FLOPs-", "x b=1", "x b=256")


def _cell(value: object, width: int, spec: str) -> str:
    text = "-" if value is None else spec.format(value)
    return f"{text:>{width}}" if not isinstance(value, str) else f"{text:<{width}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--prepare-only", action="store_true", help="train and cache, no timing")
    certification_options(parser, n_cal=[100, 1000], target_risk=0.05)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dataset = args.dataset
    if dataset == "fashion-mnist":
        try:
            load_dataset(dataset)
        except DatasetNotFoundError as error:
            print(f"Fashion-MNIST is not installed here ({error}); running on mnist-5k instead.")
            dataset = "mnist-5k"
    config = DemoConfig(
        dataset=dataset,
        seed=args.seed,
        trials=args.trials,
        delta=args.delta,
        target_risk=args.target_risk,
        timing_repeats=args.repeats,
        progress=False,
        cache_dir=args.cache_dir,
        write=False,
    )
    start = time.perf_counter()
    prepared, mechanisms, models = build_mechanisms(config)
    print(f"models and tables ready in {time.perf_counter() - start:.0f} s")
    if args.prepare_only:
        return
    runs = []
    for n_cal in args.n_cal:  # a few calibration sizes, each a full comparison
        results = compare_mechanisms(
            dataclasses.replace(config, n_cal=n_cal), prepared, mechanisms, models
        )
        runs.append(results)
        for risk in config.risks:  # two risks
            print(
                f"\n{dataset}, {risk}: ucb-wsr at eps = {args.target_risk}, delta = {args.delta}, "
                f"n = {n_cal}, {args.trials} splits, {args.threads} threads"
            )
            print(
                " ".join(
                    f"{h:>{w}}" if i else f"{h:<{w}}"
                    for i, (h, (_, w, _)) in enumerate(zip(HEADER, COLUMNS, strict=True))
                )
            )
            for row in results["comparison"]:
                if row["risk"] == risk:
                    print(" ".join(_cell(row[key], width, spec) for key, width, spec in COLUMNS))
    out = results_path(args.out, f"mechanisms-{dataset}")
    report = {
        "dataset": dataset,
        "machine": machine_info(),
        "models": runs[0]["models"],
        "runs": [
            {
                "n_cal": run["settings"]["n_cal"],
                "settings": run["settings"],
                "comparison": [
                    {k: v for k, v in row.items() if k != "policy"} for row in run["comparison"]
                ],
                "anytime_curves": run["anytime_curves"],
            }
            for run in runs
        ],
    }
    out.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
