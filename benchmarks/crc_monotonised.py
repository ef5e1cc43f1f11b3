"""What CRC's assumption-free guarantee costs: monotonised losses against the paper's CRC.

``crc`` runs conformal risk control on per-sample monotonised losses (each sample's loss at a
row replaced by its maximum over the rows before it), which needs no assumption about the
network; ``crc-marginal`` is the paper's CRC on the losses themselves, valid only when the
risk is monotone along the grid. This prints, per table, target risk and procedure, the mean
saving and the mean risk of the selected row over repeated splits (UCB-WSR for reference),
and writes ``benchmarks/results/crc-monotonised.json``.

Tables: the released CALM loss table (n_cal = 100), and the project's own digits classifier
(four risks, n_cal = 100) and digits segmenter (four risks, n_cal = 400), trained or loaded
from the model cache.

    python benchmarks/crc_monotonised.py [--trials 200] [--skip-models]
"""

from __future__ import annotations

import argparse
import json
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

import exitguard

PROCEDURES = ("crc-marginal", "crc", "ucb-wsr")
TARGET_RISKS = (0.02, 0.05, 0.1)


def calm_tables() -> list[tuple[str, dict[str, np.ndarray], int]]:
    source = resources.files("exitguard") / "data" / "calm_cnndm.npz"
    with resources.as_file(source) as path, np.load(path) as data:
        return [("CALM ROUGE-L gap", {"losses": data["losses"], "cost": data["cost"]}, 100)]


def model_tables() -> list[tuple[str, dict[str, np.ndarray], int]]:
    from exitguard.risk.losses import RISKS
    from exitguard.tasks import classification, segmentation

    out = []
    prepared = classification.prepare(classification.DemoConfig(progress=False), log=lambda _: None)
    for risk in RISKS:
        tables = classification.risk_tables(prepared, risk, seed=0)
        out.append((f"digits classifier, {risk}", tables, 100))
    seg = segmentation.prepare(segmentation.DemoConfig(progress=False), log=lambda _: None)
    for risk in seg.outputs.losses:
        out.append((f"digits segmenter, {risk}", seg.tables(risk), 400))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--skip-models", action="store_true", help="CALM only")
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "crc-monotonised.json")
    )
    args = parser.parse_args()
    tables = calm_tables() + ([] if args.skip_models else model_tables())
    rows: list[dict[str, Any]] = []
    print(f"{args.trials} splits; saving = 1 - mean cost / full cost; risk = mean population risk")
    header = f"{'table':<44}{'eps':>6}" + "".join(f"{p:>22}" for p in PROCEDURES)
    print(header)
    print("-" * len(header))
    for name, table, n_cal in tables:
        bound = 2.0 if "distribution" in name else 1.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = exitguard.evaluate(
                table["losses"],
                procedures=PROCEDURES,
                target_risks=TARGET_RISKS,
                n_cal=n_cal,
                trials=args.trials,
                loss_bound=bound,
                cost=table["cost"],
                seed=0,
            )
        for eps in TARGET_RISKS:
            cells = []
            for procedure in PROCEDURES:
                row = result.row(procedure, eps)
                saving = row.relative_saving or 0.0
                cells.append(f"{100 * saving:6.1f}% / {row.mean_population_risk:.4f}")
                rows.append(
                    {
                        "table": name,
                        "n_cal": n_cal,
                        "target_risk": eps,
                        "procedure": procedure,
                        "relative_saving": row.relative_saving,
                        "mean_population_risk": row.mean_population_risk,
                        "mean_test_risk": row.mean_test_risk,
                    }
                )
            print(f"{name:<44}{eps:>6.2f}" + "".join(f"{c:>22}" for c in cells))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"trials": args.trials, "rows": rows}, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
