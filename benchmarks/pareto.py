"""Pareto Testing over per-exit threshold vectors against the certified single threshold.

Side by side at equal (epsilon, delta, n), on the same random calibration/test splits of each
task's held-out per-exit outputs (100 splits), with
:func:`exitguard.pareto_evaluation.compare_methods`:

* ``single UCB-WSR``: the certified scalar threshold of ``calibrate_table`` (the default);
* ``single LTT-HB``: the same grid with Hoeffding-Bentkus fixed-sequence testing;
* ``pareto WSR``: Pareto Testing over threshold vectors (half the calibration samples search
  and order, half test: the paper's split), with UCB-WSR p-values;
* ``pareto WSR 1/4``: the same with a quarter of the samples learning the order and three
  quarters testing;
* ``pareto WSR +ext``: Pareto Testing whose order comes from ``n`` further *unlabeled*
  held-out samples (an external optimisation set, valid for a label-free risk), so all ``n``
  calibration samples test. Not at equal data: it uses ``n`` unlabeled samples more.

With two risks the single threshold is tested for both at once along its natural order
(multi-risk fixed-sequence testing on all ``n`` samples). A tail risk ``NAME>T`` is
``P(loss > T)``. Reported: FLOPs saved against the full model (test split), the mean exit
(1-based), the test risk, the share of splits whose test risk exceeds epsilon, the same on
the whole held-out set as the population (with a one-sided binomial p-value of "rate <=
delta"), and the relative FLOPs reduction of each Pareto row against single UCB-WSR on the
same splits (paired, with its standard error). Not a timing benchmark:

    flock -s /tmp/exitguard-cpu.lock python benchmarks/pareto.py --tasks fashion-mnist segmentation
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from exitguard.pareto_evaluation import (
    DEFAULT_METHODS,
    PerExitOutputs,
    compare_methods,
    compare_on_table,
)
from exitguard.risk.exits import default_thresholds
from exitguard.risk.losses import get_risk, per_exit_losses
from exitguard.risk.pareto import VectorSearch
from exitguard.risk.tail import exceedance_losses

SEARCH = VectorSearch(restarts=1, multipliers=12)


def classification_task(dataset: str, seed: int) -> tuple[PerExitOutputs, list[Any]]:
    from exitguard.risk.confidence import confidences
    from exitguard.tasks.classification import DemoConfig, prepare

    prepared = prepare(DemoConfig(dataset=dataset, progress=False, seed=seed), log=print)
    probs, labels = prepared.outputs.probs, prepared.heldout.labels
    risks = ("prediction_consistency", "prediction_gap", "distribution_consistency")
    outputs = PerExitOutputs(
        name=f"classification/{dataset}",
        confidences=confidences(probs, measure="max_softmax"),
        per_exit={r: per_exit_losses(probs, labels, get_risk(r, rng=seed)) for r in risks},
        loss_bounds={r: get_risk(r).loss_bound for r in risks},
        exit_cost=prepared.exit_flops,
        head_cost=np.array(prepared.flops.head, dtype=np.float64),
        full_cost=float(prepared.flops.full),
        grid=default_thresholds(),
    )
    small, large = (100, 400) if dataset == "digits" else (100, 1000)
    # The tight target and the two risks only at the larger n, to keep the run short (at
    # n = 100 no method certifies a 0-1 risk of 0.02: with no loss in 100 samples the WSR
    # wealth reaches 1.02^100 = 7.2 < 1 / delta, and HB's p-value 0.98^100 = 0.13).
    cases = [
        (["prediction_consistency"], [0.05], small),
        (["prediction_consistency"], [0.05], large),
        (["prediction_consistency"], [0.02], large),
        (["prediction_consistency", "prediction_gap"], [0.05, 0.02], large),
        (["prediction_consistency", "distribution_consistency>0.5"], [0.05, 0.03], large),
    ]
    return outputs, cases


def segmentation_task(dataset: str, seed: int) -> tuple[PerExitOutputs, list[Any]]:
    from exitguard.tasks.segmentation import GRID_STEP, LOSS_BOUNDS, DemoConfig, prepare

    prepared = prepare(DemoConfig(dataset=dataset, progress=False, seed=seed), log=print)
    data = prepared.outputs
    outputs = PerExitOutputs(
        name=f"segmentation/{dataset}",
        confidences=data.confidences[prepared.measures[0].__name__],
        per_exit=dict(data.losses),
        loss_bounds=dict(LOSS_BOUNDS),
        exit_cost=prepared.exit_flops,
        head_cost=np.array(prepared.flops.head, dtype=np.float64),
        full_cost=float(prepared.flops.full),
        grid=default_thresholds(GRID_STEP),
    )
    cases = [
        (["prediction_consistency"], [0.05], 100),
        (["prediction_consistency"], [0.05], 400),
        (["prediction_consistency"], [0.02], 400),
        (["prediction_consistency", "distribution_consistency"], [0.05, 0.1], 400),
    ]
    return outputs, cases


def calm_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The CALM table (one scalar grid with CALM's decay: no per-exit outputs to search).

    Its rows are tested in their natural order (single) or in an order learnt on a quarter
    of the calibration set (Pareto Testing over the rows); with a tail risk beside the mean
    ROUGE-L drop, both are promised at once.
    """
    from importlib import resources

    source = resources.files("exitguard") / "data" / "calm_cnndm.npz"
    with resources.as_file(source) as path, np.load(path, allow_pickle=False) as data:
        losses, cost = data["losses"], data["cost"]  # (K, N) signed ROUGE-L drops, (K,) layers
    print(f"\ncalm/cnndm: N = {losses.shape[1]}, {losses.shape[0]} thresholds, cost in layers")
    rows = []
    cases = [
        (["rouge_drop"], [0.05], losses[None], [1.0]),
        (
            ["rouge_drop", "rouge_drop>0.2"],
            [0.05, 0.05],
            np.stack([losses, exceedance_losses(losses, 0.2)]),
            [1.0, 1.0],
        ),
    ]
    for risks, targets, table, bounds in cases:
        goal = " + ".join(f"{r} <= {e:g}" for r, e in zip(risks, targets, strict=True))
        print(f" {goal}, n = 500", flush=True)
        found = compare_on_table(
            table,
            cost,
            name="calm/cnndm",
            risks=risks,
            target_risks=targets,
            loss_bounds=bounds,
            n_cal=500,
            trials=args.trials,
            delta=args.delta,
            seed=args.seed,
        )
        print_rows(found)
        rows.extend(found)
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        risk = " ".join(f"{r:.4f}" for r in row["mean_test_risk"])
        reduction = row.get("flops_reduction_vs_single")
        versus = (
            ""
            if reduction is None
            else f"{100 * reduction:+7.1f}% ±{100 * row['flops_reduction_se']:.1f}"
        )
        exit_ = "" if row["mean_exit"] is None else f"{row['mean_exit']:.2f}"
        print(
            f"  {row['method']:<16}{100 * row['flops_saving']:>7.1f}%{exit_:>7}"
            f"  {risk:<16}{row['violation_rate']:>6.2f}{row['population_violation_rate']:>6.2f}"
            f"{row['violation_p_value']:>8.3f}{row['certified_rate']:>6.2f}  {versus}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["fashion-mnist", "segmentation", "calm"])
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = []
    for name in args.tasks:
        if name == "calm":
            results.extend(calm_rows(args))
            continue
        try:
            if name == "segmentation":
                outputs, cases = segmentation_task("digits", args.seed)
            else:
                outputs, cases = classification_task(name, args.seed)
        except (FileNotFoundError, OSError) as error:
            print(f"{name}: skipped ({error}); `sudo scripts/install-data.sh` installs it")
            continue
        print(
            f"\n{outputs.name}: N = {len(outputs.confidences)}, "
            f"{outputs.confidences.shape[1]} exits, delta = {args.delta}, {args.trials} splits"
        )
        print(
            f"  {'method':<16}{'FLOPs':>8}{'exit':>7}  {'test risk':<16}{'viol.':>6}"
            f"{'pop.':>6}{'p(viol)':>8}{'cert.':>6}  FLOPs vs single UCB-WSR"
        )
        for risks, targets, n in cases:
            goal = " + ".join(f"{r} <= {e:g}" for r, e in zip(risks, targets, strict=True))
            print(f" {goal}, n = {n}", flush=True)
            rows = compare_methods(
                outputs,
                risks,
                targets,
                n_cal=n,
                trials=args.trials,
                delta=args.delta,
                seed=args.seed,
                search=SEARCH,
            )
            print_rows(rows)
            results.extend(rows)
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / "pareto.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():  # keep the rows of tasks not run this time
        done = {row["task"] for row in results}
        kept = [r for r in json.loads(out.read_text())["rows"] if r["task"] not in done]
        results = kept + results
    report = {
        "delta": args.delta,
        "trials": args.trials,
        "seed": args.seed,
        "search": SEARCH.to_dict(),
        "methods": [
            {
                "method": m.name,
                "kind": m.kind,
                "procedure": m.procedure,
                "opt_fraction": m.opt_fraction,
            }
            for m in DEFAULT_METHODS
        ],
        "rows": results,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
