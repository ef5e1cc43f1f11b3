"""The mechanisms side by side: certified at the same (epsilon, delta, n), timed for real.

``run_demo(DemoConfig())``:

1. trains or loads the classification demo's multi-exit CNN and collects its held-out exits
   (:func:`exitguard.tasks.classification.prepare`); trains or loads the cascade's smaller
   members, the halting units and the skip network on the same training split;
2. builds every mechanism's loss and cost table on the held-out data
   (:mod:`~exitguard.tasks.mechanisms.collect`): branch exits (softmax confidence), cascade,
   learned halting, anytime prediction at fixed budgets, layer skipping;
3. checks every mechanism over repeated random calibration/test splits for the prediction gap
   and the consistency risk (test risk, violation rates with a binomial test, FLOPs saved,
   for a grid of target risks);
4. certifies every mechanism on one calibration split at the demo's (epsilon, delta, n), runs
   the certified configuration for real on the rest (real = simulated checked at batch 1 and
   256) and times it against its full model at batch 1 and 256, side by side;
5. gives anytime prediction's certified per-budget risk curve;
6. writes the report (:func:`exitguard.tasks.mechanisms.report.write_mechanism_report`).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from exitguard.calibration import CertifiedAboveTargetWarning, RiskNotControlledWarning
from exitguard.nn.anytime import AnytimeNetwork
from exitguard.nn.cascade import Cascade
from exitguard.tasks import classification
from exitguard.tasks.common import machine_info, results_header
from exitguard.tasks.mechanisms.collect import (
    RISKS,
    anytime_table,
    branch_table,
    cascade_table,
    halting_table,
    skip_thresholds,
    skipping_table,
)
from exitguard.tasks.mechanisms.models import FullModel
from exitguard.tasks.mechanisms.report import write_mechanism_report
from exitguard.tasks.mechanisms.tables import (
    MechanismTable,
    budget_risk_curve,
    certify,
    evaluate_table,
)
from exitguard.tasks.mechanisms.train import (
    load_or_train_halting,
    load_or_train_member,
    load_or_train_skipping,
    mechanism_settings,
)

TARGET_RISKS = (0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2)
MECHANISMS = ("branch exits", "cascade", "learned halting", "anytime", "layer skipping")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Settings of :func:`run_demo`.

    Every mechanism is certified at ``target_risk`` with ``procedure`` on ``n_cal`` samples
    (one split, then timed for real), and checked with ``procedures`` at every target risk
    of ``target_risks`` over ``trials`` random splits.
    """

    dataset: str = "digits"
    dataset_path: str | None = None
    out: str = "exitguard-report/mechanisms"
    seed: int = 0
    n_cal: int = 300
    trials: int = 100
    delta: float = 0.1
    target_risk: float = 0.05
    target_risks: tuple[float, ...] = TARGET_RISKS
    procedure: str = "ucb-wsr"
    procedures: tuple[str, ...] = ("crc", "ucb-wsr", "ltt")
    risks: tuple[str, ...] = RISKS
    quick: bool = False
    progress: bool = True
    cache_dir: str | None = None
    epochs: int | None = None
    timing_repeats: int | None = None
    timing_batch1: int = 64
    timing_batch256: int = 512
    skip_grid: int = 20
    write: bool = True

    def __post_init__(self) -> None:
        if self.target_risk not in self.target_risks:
            object.__setattr__(
                self, "target_risks", tuple(sorted({*self.target_risks, self.target_risk}))
            )


@dataclasses.dataclass(frozen=True, repr=False)
class Mechanism:
    """One mechanism of the demo: its table and how to run a configuration of it.

    ``run(x, value)`` is the real inference, ``simulate(x, value)`` the full-pass reference;
    both return an object with ``predictions`` and a per-sample decision tensor
    (``decisions``: the exit taken, or which gated blocks ran). ``full`` is the parameter of
    the full model.
    """

    name: str
    table: MechanismTable
    run: Callable[[Tensor, float], Any]
    simulate: Callable[[Tensor, float], Any]
    decisions: Callable[[Any], Tensor]
    full: float


def _exits(result: Any) -> Tensor:
    return result.exits


def _ran(result: Any) -> Tensor:
    return result.ran


def build_mechanisms(
    config: DemoConfig, *, log: Callable[[str], None] = print
) -> tuple[classification.Prepared, dict[str, Mechanism], dict[str, Any]]:
    """Train or load every model and build every mechanism's table on the held-out data."""
    prepared = classification.prepare(
        classification.DemoConfig(
            dataset=config.dataset,
            dataset_path=config.dataset_path,
            seed=config.seed,
            quick=config.quick,
            progress=config.progress,
            cache_dir=config.cache_dir,
            epochs=config.epochs,
        ),
        log=log,
    )
    settings = mechanism_settings(config.dataset, quick=config.quick, seed=config.seed)
    if config.epochs is not None:  # one knob for every model (tests, smoke runs)
        settings = dataclasses.replace(
            settings,
            cascade_train=dataclasses.replace(settings.cascade_train, epochs=config.epochs),
            halting_train=dataclasses.replace(settings.halting_train, epochs=config.epochs),
            skip_train=dataclasses.replace(
                settings.skip_train, epochs=config.epochs + 1, warmup_epochs=1
            ),
        )
    train, heldout, network = prepared.train, prepared.heldout, prepared.network
    images = torch.from_numpy(heldout.images)
    labels = heldout.labels
    common: dict[str, Any] = {"cache_dir": config.cache_dir, "log": log}
    start = time.perf_counter()
    members = [
        load_or_train_member(
            train,
            config=member,
            settings=settings.cascade_train,
            max_train=settings.max_train,
            progress=config.progress,
            **common,
        ).module.eval()
        for member in settings.cascade  # a few members
    ]
    cascade = Cascade([*members, FullModel(network)], input_shape=train.image_shape).eval()
    halting = load_or_train_halting(
        network,
        train,
        hidden=settings.halting_hidden,
        config=settings.halting_train,
        exit_cost=prepared.exit_flops,
        **common,
    )
    skipping = load_or_train_skipping(
        train,
        config=settings.skip,
        settings=settings.skip_train,
        max_train=settings.max_train,
        **common,
    )
    log(f"mechanism models ready in {time.perf_counter() - start:.0f} s")
    anytime = AnytimeNetwork(network, images[:1])
    skip_net = skipping.module.eval()
    grid = skip_thresholds(skip_net, torch.from_numpy(train.images[:2000]), count=config.skip_grid)
    cascade_flops = cascade.count_flops(images[:1])
    halting_flops = halting.module.count_flops(images[:1])
    skip_flops = skip_net.count_flops(images[:1])
    outputs = prepared.outputs
    tables = {
        "branch exits": branch_table(
            outputs.probs, outputs.confidences, labels, flops=prepared.flops, risks=config.risks
        ),
        "cascade": cascade_table(cascade, images, labels, flops=cascade_flops, risks=config.risks),
        "learned halting": halting_table(
            halting.module, images, labels, flops=halting_flops, risks=config.risks
        ),
        "anytime": anytime_table(anytime, outputs.probs, labels, risks=config.risks),
        "layer skipping": skipping_table(
            skip_net, images, labels, thresholds=grid, flops=skip_flops, risks=config.risks
        ),
    }
    runners: dict[str, tuple[Any, ...]] = {  # run, simulate, decisions, full (see Mechanism)
        "branch exits": (network.infer, network.simulate, _exits, math.inf),
        "cascade": (cascade.infer, cascade.simulate, _exits, math.inf),
        "learned halting": (halting.module.infer, halting.module.simulate, _exits, math.inf),
        "anytime": (
            lambda x, value: anytime.infer(x, budget=value),
            lambda x, value: anytime.simulate(x, budget=value),
            _exits,
            float(anytime.budget_cost()[-1]),
        ),
        "layer skipping": (skip_net.infer, skip_net.simulate, _ran, 0.0),
    }
    mechanisms = {name: Mechanism(name, tables[name], *runner) for name, runner in runners.items()}
    with torch.inference_mode():
        skip_full = torch.cat([skip_net(b) for b in torch.split(images, 256)]).argmax(1).numpy()
    skip_accuracy = float((skip_full == labels).mean())
    models = {
        "classifier accuracy per exit": (outputs.probs.argmax(-1) == labels[:, None])
        .mean(axis=0)
        .tolist(),
        "cascade accuracy per model": (
            np.stack([_argmax(cascade, images, m) for m in range(cascade.n_exits)], 1)
            == labels[:, None]
        )
        .mean(axis=0)
        .tolist(),
        "skip network accuracy (every block)": skip_accuracy,
        "flops": {
            "branch exits": prepared.flops.to_dict(),
            "cascade": cascade_flops.to_dict(),
            "learned halting": halting_flops.to_dict(),
            "anytime budgets": anytime.budget_cost().tolist(),
            "layer skipping": skip_flops.to_dict(),
        },
        "halting training": halting.metadata.get("history"),
        "skip training": skipping.metadata.get("history"),
        "skip thresholds": grid.tolist(),
    }
    return prepared, mechanisms, models


def _argmax(cascade: Cascade, images: Tensor, index: int) -> np.ndarray:
    with torch.inference_mode():
        logits = torch.cat([cascade.models[index](b) for b in torch.split(images, 256)])
    return logits.argmax(dim=1).numpy()


def _time_side_by_side(
    run: Callable[[Tensor, float], Any],
    images: Tensor,
    values: tuple[float, float],
    *,
    batch_size: int,
    repeats: int,
) -> dict[str, float]:
    """Milliseconds per image of the full model and of the policy, measured alternately.

    Each repeat times one pass over ``images`` with each value in turn (after one warm-up
    pass of each), so both see the same machine state; medians are reported.
    """
    batches = list(torch.split(images, batch_size))
    times: dict[float, list[float]] = {values[0]: [], values[1]: []}

    def one_pass(value: float) -> float:
        start = time.perf_counter()
        for batch in batches:  # the batches of one pass, in order
            run(batch, value)
        return time.perf_counter() - start

    for value in values:
        one_pass(value)
    for _ in range(repeats):  # alternate, so drift in machine load hits both alike
        for value in values:
            times[value].append(one_pass(value))
    full, policy = (1000 * float(np.median(times[v])) / len(images) for v in values)
    return {"full_ms_per_image": full, "policy_ms_per_image": policy, "speedup": full / policy}


def _real_equals_simulated(mechanism: Mechanism, x: Tensor, value: float, batch_size: int) -> bool:
    """Decisions equal and predictions equal between real and simulated runs, batch by batch."""
    for batch in torch.split(x, batch_size):
        real, simulated = mechanism.run(batch, value), mechanism.simulate(batch, value)
        if not torch.equal(mechanism.decisions(real), mechanism.decisions(simulated)):
            return False
        if not torch.equal(real.predictions, simulated.predictions):
            return False
    return True


def _time_and_check(
    mechanism: Mechanism, images: Tensor, value: float, *, config: DemoConfig, repeats: int
) -> dict[str, Any]:
    """``value`` timed against the full model at batch 256 and 1, and real = simulated checked."""
    timings: dict[str, Any] = {
        str(batch_size): _time_side_by_side(
            mechanism.run,
            images[:count],
            (mechanism.full, value),
            batch_size=batch_size,
            repeats=repeats,
        )
        for batch_size, count in ((256, config.timing_batch256), (1, config.timing_batch1))
    }
    timings["equal"] = (  # batch 256 over every test image, batch 1 over the timed ones
        _real_equals_simulated(mechanism, images, value, 256)
        and _real_equals_simulated(mechanism, images[: config.timing_batch1], value, 1)
    )
    return timings


def run_demo(config: DemoConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the mechanisms demo and write its report (when ``config.write``); the results dict."""
    start = time.perf_counter()
    prepared, mechanisms, models = build_mechanisms(config, log=log)
    results = compare_mechanisms(config, prepared, mechanisms, models, log=log)
    results["seconds"] = time.perf_counter() - start
    if config.write:
        write_mechanism_report(results, Path(config.out))
    return results


def compare_mechanisms(
    config: DemoConfig,
    prepared: classification.Prepared,
    mechanisms: dict[str, Mechanism],
    models: dict[str, Any],
    *,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Steps 3 to 5 of :func:`run_demo` on built mechanisms: the results dict (no file written).

    Uses ``config``'s calibration size, splits, target risks, procedures and timing settings,
    so one set of built mechanisms can be compared at several settings.
    """
    torch_threads = torch.get_num_threads()
    heldout = prepared.heldout
    images = torch.from_numpy(heldout.images)
    n_total = len(heldout)
    if not 2 <= config.n_cal < n_total:
        raise ValueError(
            f"`n_cal` must be in [2, {n_total - 1}] to leave a test split of the {n_total} "
            f"held-out samples; got {config.n_cal}."
        )
    order = np.random.default_rng(config.seed + 1).permutation(n_total)
    cal, test = np.sort(order[: config.n_cal]), np.sort(order[config.n_cal :])
    repeats = config.timing_repeats or (2 if config.quick else 3)
    rows: list[dict[str, Any]] = []
    timings: dict[tuple[str, float], dict[str, Any]] = {}  # both risks may certify one value
    evaluations: dict[str, dict[str, Any]] = {}
    tradeoffs: dict[str, dict[str, Any]] = {}
    log(f"certifying and timing {len(mechanisms)} mechanisms")
    for name, mechanism in mechanisms.items():  # five mechanisms, each with its own models
        table = mechanism.table
        evaluations[name] = {}
        tradeoffs[name] = {
            "parameter": table.parameter,
            "values": [v if math.isfinite(v) else None for v in table.values.tolist()],
            "flops_fraction": (table.cost.mean(axis=1) / table.full_cost).tolist(),
            "risk": {risk: table.loss(risk).mean(axis=1).tolist() for risk in config.risks},
        }
        for risk in config.risks:  # two risks
            evaluation = evaluate_table(
                table,
                risk=risk,
                procedures=config.procedures,
                target_risks=config.target_risks,
                delta=config.delta,
                n_cal=config.n_cal,
                trials=config.trials,
                seed=config.seed,
            )
            evaluations[name][risk] = evaluation.to_dict()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RiskNotControlledWarning)
                warnings.simplefilter("ignore", CertifiedAboveTargetWarning)
                policy = certify(
                    table.subset(cal),
                    risk=risk,
                    target_risk=config.target_risk,
                    delta=config.delta,
                    procedure=config.procedure,
                    seed=config.seed,
                )
            index = policy.index
            test_images = images[test]
            key = (name, policy.value)
            if key not in timings:
                timings[key] = _time_and_check(
                    mechanism, test_images, policy.value, config=config, repeats=repeats
                )
            timing_256, timing_1 = timings[key]["256"], timings[key]["1"]
            split_row = evaluation.row(config.procedure, config.target_risk)
            rows.append(
                {
                    "mechanism": name,
                    "risk": risk,
                    "parameter": table.parameter,
                    "value": policy.value if math.isfinite(policy.value) else None,
                    "certified": policy.certified,
                    "certified_risk": policy.upper_bound if policy.certified else None,
                    "calibration_risk": policy.policy.empirical_risk,
                    "test_risk": float(table.loss(risk)[index, test].mean()),
                    "flops_saved": 1.0
                    - float(table.cost[index, test].mean()) / float(table.cost[0, test].mean()),
                    "mean_test_risk": split_row.mean_test_risk,
                    "violation_rate": split_row.violation_rate,
                    "population_violation_rate": split_row.population_violation_rate,
                    "violation_p_value": split_row.violation_p_value,
                    "mean_flops_saved": split_row.relative_saving,
                    "certified_rate": split_row.certified_rate,
                    "full_flops": table.full_cost,
                    "speedup_batch_256": timing_256["speedup"],
                    "speedup_batch_1": timing_1["speedup"],
                    "full_ms_per_image_batch_256": timing_256["full_ms_per_image"],
                    "policy_ms_per_image_batch_256": timing_256["policy_ms_per_image"],
                    "full_ms_per_image_batch_1": timing_1["full_ms_per_image"],
                    "policy_ms_per_image_batch_1": timing_1["policy_ms_per_image"],
                    "real_equals_simulated": timings[key]["equal"],
                    "policy": policy.to_dict(),
                }
            )
    curves = {}
    anytime = mechanisms["anytime"].table
    budgets = anytime.values[::-1].copy()  # increasing, one per exit
    for risk in config.risks:  # two risks
        curve = budget_risk_curve(
            prepared.outputs.probs[cal],
            heldout.labels[cal],
            risk=risk,
            budget_cost=budgets,
            delta=config.delta,
            seed=config.seed,
        )
        test_losses = anytime.loss(risk)[::-1][:, test]  # (L, n_test), exits in order
        curves[risk] = {
            **curve.to_dict(),
            "test_risk": test_losses.mean(axis=1).tolist(),
            "smallest_certified_budget": curve.smallest_budget(config.target_risk),
        }
    results = _results(config, prepared, models, rows, evaluations, tradeoffs, curves)
    results["machine"]["threads"] = torch_threads
    return results


def _results(
    config: DemoConfig,
    prepared: classification.Prepared,
    models: dict[str, Any],
    rows: list[dict[str, Any]],
    evaluations: dict[str, Any],
    tradeoffs: dict[str, Any],
    curves: dict[str, Any],
) -> dict[str, Any]:
    data = prepared.data
    eps, delta, n = config.target_risk, config.delta, config.n_cal
    summary = [
        (
            f"{data.name}: five mechanisms certified with {config.procedure} at ε = {eps:g}, "
            f"δ = {delta:g}, n = {n} on the same held-out data, checked over {config.trials} "
            "random calibration/test splits."
        ),
    ]
    for risk in config.risks:  # two risks
        part = [r for r in rows if r["risk"] == risk]
        best = max(part, key=lambda r: r["mean_flops_saved"] or 0.0)
        summary.append(
            f"{risk}: the most FLOPs saved by {best['mechanism']} "
            f"({100 * (best['mean_flops_saved'] or 0):.1f}% on average over splits); "
            + "; ".join(
                f"{r['mechanism']} {100 * (r['mean_flops_saved'] or 0):.1f}%, "
                f"viol. {r['population_violation_rate']:.2f}"
                for r in part
            )
            + "."
        )
    return {
        "task": "mechanisms",
        "title": f"exitguard: early-exit mechanisms certified on {data.name}",
        **results_header(),
        "machine": machine_info(),
        "schema": "exitguard.MechanismResults",
        "summary": summary,
        "dataset": {
            "name": data.name,
            "source": data.source,
            "n_train": len(prepared.train),
            "n_heldout": len(prepared.heldout),
            "n_cal": config.n_cal,
            "n_test": len(prepared.heldout) - config.n_cal,
        },
        "settings": {
            "target_risk": eps,
            "delta": delta,
            "n_cal": n,
            "trials": config.trials,
            "procedure": config.procedure,
            "procedures": list(config.procedures),
            "target_risks": list(config.target_risks),
            "risks": list(config.risks),
            "seed": config.seed,
            "quick": config.quick,
        },
        "models": models,
        "comparison": rows,
        "evaluations": evaluations,
        "tradeoffs": tradeoffs,
        "anytime_curves": curves,
    }
