"""The paper's CALM experiment as a benchmark: wall time of repeated-split calibration.

naive, CRC, UCB-WSR and LTT x target risks 0.01 ... 0.19 x 100 random splits x n_cal = 100 on
the released CALM CNN/DailyMail loss table (100 thresholds x 2000 articles). Prints the wall
time (median over repeats, after one warm-up) and the per-procedure table; writes JSON.
Target: under 0.5 s on a 2-core machine (the paper's official code needs about 40 s).

    python benchmarks/calibration.py [--n-cal 100] [--repeats 5] [--out results/calibration.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from importlib import resources
from pathlib import Path

import numpy as np

import exitguard

PROCEDURES = ("naive", "crc", "ucb-wsr", "ltt")
TARGET_RISKS = tuple(round(0.01 * k, 2) for k in range(1, 20))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cal", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "calibration.json")
    )
    args = parser.parse_args()

    source = resources.files("exitguard") / "data" / "calm_cnndm.npz"
    with resources.as_file(source) as path, np.load(path) as data:
        losses, cost = data["losses"], data["cost"]

    report: dict[str, object] = {
        "machine": {"python": platform.python_version(), "processor": platform.machine()},
        "procedures": PROCEDURES,
        "target_risks": TARGET_RISKS,
        "trials": args.trials,
        "runs": [],
    }
    for n_cal in args.n_cal:

        def run(n_cal: int = n_cal) -> exitguard.Evaluation:
            return exitguard.evaluate(
                losses,
                procedures=PROCEDURES,
                target_risks=TARGET_RISKS,
                delta=0.1,
                n_cal=n_cal,
                trials=args.trials,
                cost=cost,
                seed=args.seed,
            )

        run()  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = run()
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        print(
            f"\nn_cal = {n_cal}: {len(PROCEDURES)} procedures x {len(TARGET_RISKS)} target "
            f"risks x {args.trials} splits in {median:.3f} s (median of {args.repeats}; "
            f"min {min(times):.3f} s)"
        )
        print(result.table(cost_label="layers"))
        report["runs"].append(  # type: ignore[attr-defined]
            {
                "n_cal": n_cal,
                "seconds_median": median,
                "seconds_all": times,
                "evaluation": result.to_dict(),
            }
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
