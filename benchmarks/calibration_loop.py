"""A user's own loop of single calibrations, against the same loop written with MAPIE.

100 random splits (n_cal = 100) of the released CALM loss table x 3 target risks x 4
procedures (naive, CRC, UCB-WSR, LTT), one call per (split, target, procedure):

* ``exitguard``: ``exitguard.calibrate_table`` per call (defaults: WSR reads the samples in a
  seeded random permutation; the report's upper bound for the selected row);
* ``mapie``: ``mapie.risk_control.methods`` per call (``get_r_hat_plus`` for CRC and RCPS-WSR,
  ``ltt_procedure`` with fixed-sequence testing for LTT, the mean for naive) — skipped when
  MAPIE is not installed (``pip install mapie``);
* ``exitguard evaluate``: the same 1,200 selections in one vectorised call.

Timings are medians over repeats after a warm-up, all in one run, with the ratio per
procedure. Writes ``benchmarks/results/calibration-loop.json``.

    python benchmarks/calibration_loop.py [--splits 100] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np

import exitguard

PROCEDURES = ("naive", "crc", "ucb-wsr", "ltt")
TARGET_RISKS = (0.02, 0.05, 0.1)
DELTA = 0.1


def exitguard_call(procedure: str) -> Callable[[np.ndarray, float, np.ndarray], int]:
    def call(losses: np.ndarray, eps: float, thresholds: np.ndarray) -> int:
        return exitguard.calibrate_table(
            losses, target_risk=eps, delta=DELTA, procedure=procedure, thresholds=thresholds
        ).index

    return call


def mapie_call(procedure: str) -> Callable[[np.ndarray, float, np.ndarray], int] | None:
    try:
        from mapie.risk_control.methods import get_r_hat_plus, ltt_procedure
    except ImportError:
        return None

    def call(losses: np.ndarray, eps: float, thresholds: np.ndarray) -> int:
        risks = losses.T  # MAPIE reads (n, K)
        n = risks.shape[0]
        lambdas = np.clip(thresholds, 0.0, 1.0)
        if procedure == "naive":
            ok = risks.mean(axis=0) <= eps
        elif procedure in ("crc", "ucb-wsr"):
            method, bound = ("crc", None) if procedure == "crc" else ("rcps", "wsr")
            _, upper = get_r_hat_plus(risks, lambdas, method, bound, DELTA, 0.25)
            ok = upper <= eps
        else:
            r_hat = np.clip(risks, 0.0, 1.0).mean(axis=0)[None]  # HB needs losses in [0, 1]
            valid, _ = ltt_procedure(
                r_hat, np.array([[eps]]), DELTA, np.array([[n]]), fwer_method="fixed_sequence"
            )
            ok = np.zeros(len(lambdas), dtype=bool)
            ok[valid[0]] = True
        passing = np.flatnonzero(ok[1:]) + 1
        return int(passing.max()) if passing.size else 0

    return call


def mapie_version() -> str | None:
    try:
        import mapie
    except ImportError:
        return None
    return str(mapie.__version__)


def time_loop(call, tables, thresholds, repeats: int) -> list[float]:  # type: ignore[no-untyped-def]
    def once() -> None:
        for table in tables:
            for eps in TARGET_RISKS:
                call(table, eps, thresholds)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        once()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            once()
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=int, default=100)
    parser.add_argument("--n-cal", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "calibration-loop.json")
    )
    args = parser.parse_args()

    source = resources.files("exitguard") / "data" / "calm_cnndm.npz"
    with resources.as_file(source) as path, np.load(path) as data:
        losses, thresholds = data["losses"], data["thresholds"]
    rng = np.random.default_rng(0)
    splits = [rng.choice(losses.shape[1], args.n_cal, replace=False) for _ in range(args.splits)]
    tables = [losses[:, s] for s in splits]
    calls = len(tables) * len(TARGET_RISKS)

    rows = []
    print(
        f"{args.splits} splits x {len(TARGET_RISKS)} target risks, n_cal = {args.n_cal}: "
        f"ms per call (median of {args.repeats})"
    )
    print(f"{'procedure':<10}{'exitguard':>11}{'mapie':>9}{'mapie/exitguard':>17}")
    for procedure in PROCEDURES:
        ours = statistics.median(
            time_loop(exitguard_call(procedure), tables, thresholds, args.repeats)
        )
        theirs_call = mapie_call(procedure)
        theirs = (
            statistics.median(time_loop(theirs_call, tables, thresholds, args.repeats))
            if theirs_call is not None
            else None
        )
        ratio = theirs / ours if theirs is not None else None
        rows.append(
            {
                "procedure": procedure,
                "exitguard_ms_per_call": 1000 * ours / calls,
                "mapie_ms_per_call": None if theirs is None else 1000 * theirs / calls,
                "mapie_over_exitguard": ratio,
            }
        )
        mapie_text = "-" if theirs is None else f"{1000 * theirs / calls:.3f}"
        ratio_text = "-" if ratio is None else f"{ratio:.2f}x"
        print(f"{procedure:<10}{1000 * ours / calls:>11.3f}{mapie_text:>9}{ratio_text:>17}")
    ours_total = sum(r["exitguard_ms_per_call"] for r in rows) * calls / 1000
    theirs_total = (
        sum(r["mapie_ms_per_call"] for r in rows) * calls / 1000
        if all(r["mapie_ms_per_call"] is not None for r in rows)
        else None
    )
    evaluate_times = []
    for _ in range(args.repeats + 1):
        start = time.perf_counter()
        exitguard.evaluate(
            losses,
            procedures=PROCEDURES,
            target_risks=TARGET_RISKS,
            delta=DELTA,
            n_cal=args.n_cal,
            trials=args.splits,
            seed=0,
        )
        evaluate_times.append(time.perf_counter() - start)
    vectorised = statistics.median(evaluate_times[1:])
    print(
        f"\nwhole loop: exitguard {ours_total:.3f} s"
        + ("" if theirs_total is None else f", mapie {theirs_total:.3f} s")
        + f"; exitguard.evaluate (the same selections, vectorised) {vectorised:.3f} s"
    )
    report = {
        "machine": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "exitguard": exitguard.__version__,
            "mapie": mapie_version(),
        },
        "splits": args.splits,
        "n_cal": args.n_cal,
        "target_risks": TARGET_RISKS,
        "rows": rows,
        "loop_seconds": {"exitguard": ours_total, "mapie": theirs_total},
        "evaluate_seconds": vectorised,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
