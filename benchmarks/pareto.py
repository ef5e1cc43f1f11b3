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
(0-based), the test risk, the share of splits whose test risk exceeds epsilon, the same on
the whole held-out set as the population (with a one-sided binomial p-value of "rate <=
delta"), and the relative FLOPs reduction of each Pareto row against single UCB-WSR on the
same splits (paired, with its standard error). Not a timing benchmark:

    flock -s /tmp/exitguard-cpu.lock python benchmarks/pareto.py --tasks fashion-mnist segmentation

``segmentation`` is the digits scenes; ``segmentation/fashion-mnist`` the Fashion-MNIST scenes.
After each goal, the **ceiling**: on all held-out samples, the cheapest scalar and the
cheapest vector whose population risks meet the goal (no split, no test, no guarantee): the
most a certified vector could gain with unlimited calibration data. ``--ceiling-only``
computes only these and keeps the stored comparisons.
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
from exitguard.risk.configurations import evaluate_vectors
from exitguard.risk.exits import default_thresholds
from exitguard.risk.losses import get_risk, per_exit_losses
from exitguard.risk.pareto import VectorSearch, search_vectors
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
    if dataset == "fashion-mnist":  # 2,000 held-out scenes: room for n = 1000 as well
        cases += [
            (["foreground_miscoverage"], [0.2], 400),
            (["prediction_consistency"], [0.05], 1000),
            (["prediction_consistency"], [0.02], 1000),
        ]
    return outputs, cases


CEILING_SEARCH = VectorSearch(restarts=3, multipliers=24)


def ceiling_rows(
    outputs: PerExitOutputs, risks: list[str], targets: list[float]
) -> list[dict[str, Any]]:
    """How much per-exit vectors can save at all: the population's own optimum, no statistics.

    On all held-out samples (the population of the splits), the cheapest scalar threshold
    and the cheapest vector found by a heavier search whose *population* risks are all at
    most epsilon. No split, no test, no guarantee: the room a certified vector could reach
    with unlimited calibration data. A certified gain over the single threshold larger than
    this ceiling's is impossible (up to how well the search does).
    """
    tables = [outputs.risk_table(r) for r in risks]
    per_exit = np.stack([t for t, _ in tables])  # (R, N, L)
    bounds = [b for _, b in tables]
    eps = np.asarray(targets, dtype=np.float64)
    conf = outputs.confidences
    n_exits = conf.shape[1]
    levels = np.unique(np.quantile(conf[:, :-1], np.linspace(0, 1, 2001)))[::-1]  # (G,)
    scalars = np.repeat(levels[:, None], n_exits - 1, axis=1)  # (G, L-1)
    vectors = search_vectors(
        conf,
        per_exit - per_exit[..., -1:],
        target_risks=eps,
        exit_cost=outputs.exit_cost,
        head_cost=outputs.head_cost,
        settings=CEILING_SEARCH,
        rng=0,
    )
    rows = []
    for name, candidates in (("scalar", scalars), ("vectors", np.concatenate([scalars, vectors]))):
        table = evaluate_vectors(
            conf,
            per_exit,
            candidates,
            loss_bounds=bounds,
            exit_cost=outputs.exit_cost,
            head_cost=outputs.head_cost,
        )
        risk = table.losses.mean(axis=-1)  # (R, M) population risks
        cost = table.cost.mean(axis=-1)  # (M,)
        feasible = np.all(risk <= eps[:, None], axis=0)
        best = int(np.flatnonzero(feasible)[np.argmin(cost[feasible])]) if feasible.any() else -1
        used = cost[best] if best >= 0 else outputs.full_cost
        rows.append(
            {
                "task": outputs.name,
                "risks": list(risks),
                "target_risks": list(targets),
                "method": f"ceiling {name}",
                "kind": "ceiling (population optimum, no guarantee)",
                "flops_saving": 1.0 - used / outputs.full_cost,
                "population_risk": risk[:, best].tolist() if best >= 0 else [0.0] * len(risks),
                "candidates": len(candidates),
            }
        )
    scalar_cost, vector_cost = (1.0 - r["flops_saving"] for r in rows)
    rows[1]["flops_reduction_vs_single"] = (
        (scalar_cost - vector_cost) / scalar_cost if scalar_cost > 0 else 0.0
    )
    return rows


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


def step_flops(flops: dict[str, Any], limits: np.ndarray, exits: np.ndarray) -> np.ndarray:
    """FLOPs of every denoising step; limits (M, T, L-1), exits (M, N, T) -> (M, N, T).

    A step that leaves at exit ``l`` runs the embedding, blocks ``0..l``, the UEMs of the
    exits up to ``l`` whose threshold at that step is finite, and head ``l``; a step whose
    thresholds are all ``inf`` is the plain full step (no UEM).
    """
    blocks = np.cumsum(np.asarray(flops["block"], dtype=np.float64))  # (L,)
    head = np.asarray(flops["head"], dtype=np.float64)  # (L,)
    uem = np.asarray(flops["uem"], dtype=np.float64)  # (L-1,)
    active = np.cumsum(np.isfinite(limits) * uem, -1)  # (M, T, L-1) UEMs run up to each exit
    ran = np.concatenate([active, active[..., -1:]], -1)  # (M, T, L) the last: every UEM
    taken = exits.astype(np.int64)  # (M, N, T)
    charged = np.take_along_axis(ran[:, None], taken[..., None], axis=-1)[..., 0]  # (M, N, T)
    cost = float(flops["embed"]) + blocks[taken] + head[taken] + charged
    never = np.isinf(limits).all(-1)[:, None, :]  # (M, 1, T)
    return np.where(never, float(flops["full"]), cost)


def diffusion_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Diffusion: the scalar grid against threshold vectors and per-step schedules.

    The trajectory depends on the policy, so every configuration is sampled (one generation
    per configuration and noise seed, the same noise for all): the demo's pilot-chosen
    scalar grid, and for each of its thresholds ``lambda``: a vector with lower thresholds at
    later exits (``scaled``, tau = 1), and schedules that allow exits only in the first
    (noisiest) or the last half of the steps. Single: the scalar rows in their natural order;
    Pareto Testing: the order of all rows learnt on a quarter of the calibration set.
    """
    import torch

    from exitguard.risk.configurations import ThresholdFamily
    from exitguard.tasks.diffusion.demo import DemoConfig, prepare
    from exitguard.tasks.diffusion.losses import ssim_loss
    from exitguard.tasks.diffusion.sample import sample, sample_noise, to_unit

    torch.set_num_threads(2)
    n = 200 if args.tiny else 1000
    config = DemoConfig(dataset="digits", seed=args.seed, n_samples=n, progress=False)
    if args.tiny:
        from exitguard.tasks.diffusion.model import DenoiserConfig
        from exitguard.tasks.diffusion.train import TrainSettings

        config = DemoConfig(
            dataset="digits",
            seed=args.seed,
            n_samples=n,
            n_cal=100,
            progress=False,
            n_thresholds=8,
            model=DenoiserConfig(width=32, depth=5, n_heads=2, steps=12, reference_steps=120),
            train=TrainSettings(iterations=40, batch_size=32, warmup=5, seed=args.seed),
            pilot_samples=8,
        )
    prepared = prepare(config, log=print)
    model, swept = prepared.model, prepared.sweep
    steps, width = model.config.steps, model.n_exits - 1
    grid = swept.thresholds  # (K,) inf first
    lambdas = grid[1:]
    scaled = ThresholdFamily("scaled", tau=1.0).vectors(lambdas, model.n_exits)[1:]  # (K-1, L-1)
    half = np.arange(steps) < steps // 2  # (T,) the first, noisiest, half of the steps
    shape = (len(lambdas), steps, width)
    early = np.broadcast_to(np.where(half[None, :, None], lambdas[:, None, None], np.inf), shape)
    late = np.broadcast_to(np.where(~half[None, :, None], lambdas[:, None, None], np.inf), shape)
    extra = np.concatenate(
        [np.broadcast_to(scaled[:, None, :], shape), early, late]
    )  # (M, T, L-1) the per-exit and per-step configurations
    print(f"diffusion/digits: sampling {len(extra)} more configurations x {n} seeds", flush=True)
    losses = np.zeros((len(extra), n))
    exits = np.zeros((len(extra), n, steps), dtype=np.int64)
    full = torch.from_numpy(swept.images[0])  # (N, C, H, W) the full model's images
    batch = 16  # samples per call; every configuration of them in one call
    for start in range(0, n, batch):  # a loop over batches of noise seeds: bounded memory
        ids = np.arange(start, min(n, start + batch))
        noise = sample_noise(
            ids, seed=swept.seed, steps=steps, image_shape=model.config.image_shape
        )
        rows = noise.repeat(len(extra), 1, 1, 1, 1)  # (M*b, T, C, H, W)
        limits = torch.from_numpy(np.repeat(extra, len(ids), axis=0))  # (M*b, T, L-1)
        result = sample(model, rows, threshold=limits, earliest_exit=swept.earliest_exit)
        images = to_unit(result.images)  # (M*b, C, H, W)
        against = full[ids].repeat(len(extra), 1, 1, 1)
        losses[:, ids] = ssim_loss(images, against).double().view(len(extra), -1).numpy()
        exits[:, ids] = result.exits.view(len(extra), len(ids), steps).numpy()
    all_limits = np.concatenate(
        [np.broadcast_to(grid[:, None, None], (len(grid), steps, width)), extra]
    )  # (K + M, T, L-1)
    all_limits[:, :, : swept.earliest_exit] = np.inf
    all_exits = np.concatenate([swept.exits.astype(np.int64), exits])  # (K + M, N, T)
    cost = step_flops(swept.flops, all_limits, all_exits).sum(-1)  # (K + M, N)
    if not np.allclose(cost[: len(grid)], swept.cost):  # the sweep's own count, scalar rows
        raise RuntimeError("step_flops disagrees with the sweep's FLOPs of the scalar grid")
    table = np.concatenate([swept.losses["ssim"], losses])[None]  # (1, K + M, N)
    rows_out = []
    for target in (0.01, 0.05):
        print(f" ssim <= {target:g}, n = {config.n_cal}", flush=True)
        setting = dict(
            name="diffusion/digits",
            risks=["ssim"],
            target_risks=[target],
            loss_bounds=[1.0],
            n_cal=config.n_cal,
            trials=args.trials,
            delta=args.delta,
            seed=args.seed,
        )  # the same splits and seeds for both calls
        single = compare_on_table(table[:, : len(grid)], cost[: len(grid)], **setting)[:1]
        pareto = compare_on_table(table, cost, **setting)[1:]  # Pareto Testing over every row
        reference = single[0]["flops_saving"]
        for row in pareto:
            row["flops_reduction_vs_single"] = 1.0 - (1.0 - row["flops_saving"]) / (1.0 - reference)
            row["flops_reduction_se"] = float("nan")  # not paired across the two calls
        print_rows(single + pareto)
        rows_out.extend(single + pareto)
    return rows_out


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
    parser.add_argument("--tiny", action="store_true", help="diffusion: a tiny model (smoke run)")
    parser.add_argument(
        "--ceiling-only",
        action="store_true",
        help="per-exit tasks: only the population ceilings, kept beside the stored comparisons",
    )
    args = parser.parse_args()
    results = []
    for name in args.tasks:
        if name == "calm":
            results.extend(calm_rows(args))
            continue
        if name == "diffusion":
            results.extend(diffusion_rows(args))
            continue
        try:
            if name.startswith("segmentation"):  # segmentation[/dataset], digits scenes by default
                dataset = name.partition("/")[2] or "digits"
                outputs, cases = segmentation_task(dataset, args.seed)
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
            if not args.ceiling_only:
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
            if any(
                r["task"] == outputs.name
                and r["method"].startswith("ceiling")
                and r["risks"] == list(risks)
                and r["target_risks"] == list(targets)
                for r in results
            ):
                continue  # one ceiling per goal (it does not depend on n)
            scalar, vector = ceiling_rows(outputs, risks, targets)
            print(
                f"  ceiling (population optimum, no test): scalar "
                f"{100 * scalar['flops_saving']:.1f}%, vectors "
                f"{100 * vector['flops_saving']:.1f}% "
                f"({100 * vector['flops_reduction_vs_single']:+.1f}% FLOPs vs scalar)",
                flush=True,
            )
            results.extend([scalar, vector])
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / "pareto.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():  # keep the rows of tasks not run this time (with --ceiling-only, all
        done = {row["task"] for row in results}  # but the ceilings of the tasks run)

        def replaced(row: dict[str, Any]) -> bool:
            ceiling = row.get("kind", "").startswith("ceiling")
            return row["task"] in done and (ceiling or not args.ceiling_only)

        kept = [r for r in json.loads(out.read_text())["rows"] if not replaced(r)]
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
