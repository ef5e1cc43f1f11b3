"""The segmentation demo: train or load, calibrate every risk, run a policy, write the report."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from exitguard.calibration import calibrate_table
from exitguard.data.images import ImageDataset, load_dataset
from exitguard.data.scenes import make_scenes, upscale
from exitguard.evaluation import Evaluation, evaluate
from exitguard.nn import EarlyExitNetwork, FlopsTable, count_flops
from exitguard.nn.confidence import PIXEL_CONFIDENCES, DenseConfidence
from exitguard.policy import ExitPolicy
from exitguard.report import write_report
from exitguard.risk.exits import exit_index
from exitguard.tasks.common import (
    PROCEDURES,
    CachedModel,
    evaluate_risk,
    progress_bar,
    results_header,
    time_inference,
)
from exitguard.tasks.segmentation.collect import (
    SegmentationOutputs,
    collect_segmentation,
    confidence_measures,
    segmentation_tables,
)
from exitguard.tasks.segmentation.losses import LOSS_BOUNDS, RISK_TITLES, SEGMENTATION_RISKS
from exitguard.tasks.segmentation.model import (
    SegmenterConfig,
    SegmenterTraining,
    load_or_train,
)

TARGET_RISKS = (*(round(0.01 * k, 2) for k in range(1, 21)), 0.25, 0.3)
TABLE_TARGET_RISKS = (0.01, 0.05, 0.1)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Settings of :func:`run_demo` (``dataset`` names where the items come from).

    ``quantile`` is the q of the quantile aggregation (see :func:`confidence_measures`).
    """

    dataset: str = "digits"
    dataset_path: str | None = None
    out: str = "exitguard-report/segmentation"
    seed: int = 0
    n_cal: int = 400
    trials: int = 100
    delta: float = 0.1
    procedures: tuple[str, ...] = PROCEDURES
    target_risks: tuple[float, ...] = TARGET_RISKS
    policy_risk: str = "prediction_consistency"
    policy_procedure: str = "ucb-wsr"
    policy_target_risk: float = 0.05
    quantile: float = 0.05
    quick: bool = False
    progress: bool = True
    cache_dir: str | None = None
    n_train: int | None = None
    n_heldout: int | None = None
    epochs: int | None = None
    timing_repeats: int | None = None

    def __post_init__(self) -> None:
        if "ucb-wsr" not in self.procedures:
            raise ValueError(
                "`procedures` must include 'ucb-wsr' (the report's Table-1 columns use it); "
                f"got {self.procedures!r}."
            )


@dataclasses.dataclass(frozen=True)
class _Setup:
    size: int
    upscale: int
    n_train: int
    n_heldout: int
    training: SegmenterTraining


def _setup(config: DemoConfig) -> _Setup:
    if config.dataset == "fashion-mnist":
        training = SegmenterTraining(epochs=5 if config.quick else 10)
        setup = _Setup(64, 1, 6000, 2000, training)
    elif config.dataset == "mnist-5k":
        setup = _Setup(64, 1, 4000, 1500, SegmenterTraining(epochs=6 if config.quick else 12))
    else:
        setup = _Setup(32, 2, 3000, 1000, SegmenterTraining(epochs=8 if config.quick else 20))
    training = dataclasses.replace(
        setup.training, seed=config.seed, epochs=config.epochs or setup.training.epochs
    )
    return dataclasses.replace(
        setup,
        n_train=config.n_train or setup.n_train,
        n_heldout=config.n_heldout or setup.n_heldout,
        training=training,
    )


def scenes_for(config: DemoConfig) -> tuple[ImageDataset, ImageDataset]:
    """(training scenes, held-out scenes), built from disjoint item pools."""
    setup = _setup(config)
    items = load_dataset(config.dataset, path=config.dataset_path)
    if config.dataset == "fashion-mnist":
        train_items = items.subset(np.arange(60000))
        held_items = items.subset(np.arange(60000, len(items)))
    else:
        order = np.random.default_rng(config.seed).permutation(len(items))
        cut = len(items) // 2
        train_items, held_items = items.subset(order[:cut]), items.subset(order[cut:])
    name = f"scenes-{items.name}"
    train = make_scenes(
        upscale(train_items, setup.upscale),
        n=setup.n_train,
        size=setup.size,
        seed=config.seed,
        name=name,
    )
    heldout = make_scenes(
        upscale(held_items, setup.upscale),
        n=setup.n_heldout,
        size=setup.size,
        seed=config.seed + 10_000,
        name=name,
    )
    return train, heldout


@dataclasses.dataclass(frozen=True, repr=False)
class Prepared:
    """A trained segmenter with its per-exit confidences and losses on the held-out scenes."""

    train: ImageDataset
    heldout: ImageDataset
    trained: CachedModel[EarlyExitNetwork]
    model_config: SegmenterConfig
    training: SegmenterTraining
    measures: tuple[DenseConfidence, ...]
    outputs: SegmentationOutputs
    flops: FlopsTable

    @property
    def network(self) -> EarlyExitNetwork:
        return self.trained.module

    @property
    def exit_flops(self) -> NDArray[np.float64]:
        """(L,) FLOPs of an image that leaves at each exit (heads on the way included)."""
        return self.flops.to_exit.astype(np.float64)

    def tables(self, risk: str, measure: str | None = None) -> dict[str, NDArray[Any]]:
        """Loss, FLOPs and exit tables of ``risk`` (default measure: top-1 + mean)."""
        return segmentation_tables(
            self.outputs,
            risk=risk,
            measure=measure or self.measures[0].__name__,
            exit_flops=self.exit_flops,
            full_flops=float(self.flops.full),
        )


def prepare(config: DemoConfig, *, log: Callable[[str], None] = print) -> Prepared:
    """Build the scenes, train or load the segmenter, and run every exit on the held-out set."""
    setup = _setup(config)
    train, heldout = scenes_for(config)
    log(f"data: {heldout!r}; {len(train)} training and {len(heldout)} held-out scenes")
    model_config = SegmenterConfig()
    trained = load_or_train(
        train,
        model_config=model_config,
        settings=setup.training,
        cache_dir=config.cache_dir,
        progress=config.progress,
        log=log,
    )
    log("model: " + ("loaded from cache" if trained.from_cache else "trained and cached"))
    measures = confidence_measures(q=config.quantile, window=setup.size // 4)
    network = trained.module
    outputs = collect_segmentation(network, heldout, measures=measures, seed=config.seed)
    flops = count_flops(network, torch.from_numpy(heldout.images[:1]))
    return Prepared(
        train,
        heldout,
        trained,
        model_config,
        setup.training,
        measures,
        outputs,
        flops,
    )


def table_one(
    prepared: Prepared,
    *,
    risk: str = "prediction_consistency",
    measures: Sequence[str] | None = None,
    target_risks: Sequence[float] = TABLE_TARGET_RISKS,
    procedure: str = "ucb-wsr",
    delta: float = 0.1,
    n_cal: int = 400,
    trials: int = 100,
    seed: int = 0,
) -> dict[str, dict[str, Evaluation]]:
    """The paper's Table 1: one procedure on one risk for every confidence x aggregation.

    Returns ``{measure: {"flops": Evaluation, "exits": Evaluation}}``; the FLOPs evaluation's
    ``relative_saving`` is the FLOPs saving, the exits evaluation's the share of layers saved.
    ``measures`` names the measures to evaluate (all of ``prepared.measures`` by default).
    """
    found = {}
    names = [m.__name__ for m in prepared.measures] if measures is None else list(measures)
    for name in names:
        tables = prepared.tables(risk, name)
        common: dict[str, Any] = dict(
            procedures=procedure,
            target_risks=tuple(target_risks),
            delta=delta,
            n_cal=n_cal,
            trials=trials,
            loss_bound=LOSS_BOUNDS[risk],
            seed=seed,
        )
        found[name] = {
            "flops": evaluate(tables["losses"], cost=tables["cost"], **common),
            "exits": evaluate(tables["losses"], cost=tables["exits"] + 1.0, **common),
        }
    return found


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _saving_cells(by_flops: Evaluation, by_exit: Evaluation, eps: float) -> list[str]:
    """Layers saved, FLOPs saved and mean test risk of UCB-WSR at ``eps``."""
    row = by_flops.row("ucb-wsr", eps)
    return [
        _percent(by_exit.row("ucb-wsr", eps).relative_saving),
        _percent(row.relative_saving),
        f"{row.mean_test_risk:.4f}",
    ]


def _mask_cell(mask: NDArray[Any], n_classes: int) -> dict[str, Any]:
    return {
        "image": mask.astype(int).tolist(),
        "cmap": "nipy_spectral",
        "vmin": 0,
        "vmax": n_classes - 1,
    }


def _common(config: DemoConfig, heldout: ImageDataset) -> dict[str, Any]:
    n_cal = min(config.n_cal, len(heldout) - 10)
    return dict(delta=config.delta, n_cal=n_cal, trials=config.trials, seed=config.seed)


def evaluate_risks(prepared: Prepared, config: DemoConfig) -> dict[str, Any]:
    """Step 1: the four risks with top-1 + mean, every procedure over the whole target grid."""
    common = _common(config, prepared.heldout)
    risks: dict[str, Any] = {}
    for risk in progress_bar(SEGMENTATION_RISKS, enabled=config.progress, desc="risks"):
        tables = prepared.tables(risk)
        risks[risk] = evaluate_risk(
            tables["losses"],
            cost=tables["cost"],
            exits=tables["exits"],
            loss_bound=LOSS_BOUNDS[risk],
            procedures=config.procedures,
            target_risks=config.target_risks,
            **common,
        )
    return risks


def savings_tables(
    prepared: Prepared, config: DemoConfig, risks: dict[str, Any]
) -> list[dict[str, Any]]:
    """Step 2: Table 1 (UCB-WSR per confidence x aggregation) and the four risks' savings."""
    common = _common(config, prepared.heldout)
    size = prepared.heldout.image_shape[-1]
    table_eps = TABLE_TARGET_RISKS
    header = ["confidence / aggregation"] + [
        f"ε = {eps:g}: {what}"
        for eps in table_eps
        for what in ("layers saved", "FLOPs saved", "test risk")
    ]
    per_measure = table_one(prepared, target_risks=table_eps, **common)
    measure_rows = [
        [name]
        + [cell for eps in table_eps for cell in _saving_cells(ev["flops"], ev["exits"], eps)]
        for name, ev in per_measure.items()
    ]
    risk_rows = [
        [RISK_TITLES[risk]]
        + [
            cell
            for eps in table_eps
            for cell in _saving_cells(
                Evaluation.from_dict(data["evaluation"]),
                Evaluation.from_dict(data["evaluation_exits"]),
                eps,
            )
        ]
        for risk, data in risks.items()
    ]
    return [
        {
            "title": "UCB-WSR savings on the miscoverage risk, per confidence and aggregation",
            "header": header,
            "rows": measure_rows,
            "note": f"Mean over {config.trials} splits, n_cal = {common['n_cal']}, "
            f"δ = {config.delta:g}. Layers saved: 1 − mean exit / number of exits; FLOPs saved "
            f"against the backbone alone. Quantile q = {config.quantile:g}; patch: minimum "
            f"over the means of {size // 4}x{size // 4} windows.",
        },
        {
            "title": "UCB-WSR savings for the four risks (top-1 confidence, mean aggregation)",
            "header": ["risk", *header[1:]],
            "rows": risk_rows,
            "note": "Brier risks have B = 2, the others B = 1.",
        },
    ]


@dataclasses.dataclass(frozen=True, repr=False)
class PolicyRun:
    """Step 3's outcome: one calibrated policy run for real on the other held-out scenes."""

    policy: ExitPolicy
    measure: DenseConfidence
    test_idx: NDArray[np.int64]
    exits: NDArray[np.int64]
    early_masks: NDArray[Any]  # (T, H, W)
    full_masks: NDArray[Any]  # (T, H, W)
    probs: Tensor  # (T, C, H, W) at the exit taken
    timing: dict[str, Any]


def run_policy(prepared: Prepared, config: DemoConfig) -> PolicyRun:
    """Step 3: calibrate one policy, run it with real skipping, time it against the full model."""
    heldout, network, outputs = prepared.heldout, prepared.network, prepared.outputs
    n_cal = _common(config, heldout)["n_cal"]
    exit_flops, full_flops = prepared.exit_flops, float(prepared.flops.full)
    cal_idx, test_idx = np.split(
        np.random.default_rng(config.seed + 1).permutation(len(heldout)), [n_cal]
    )
    measure = prepared.measures[0]
    tables = prepared.tables(config.policy_risk, measure.__name__)
    policy = calibrate_table(
        tables["losses"][:, cal_idx],
        target_risk=config.policy_target_risk,
        delta=config.delta,
        procedure=config.policy_procedure,
        loss_bound=LOSS_BOUNDS[config.policy_risk],
        cost=tables["cost"][:, cal_idx],
        thresholds=tables["thresholds"],
        risk=config.policy_risk,
        confidence=measure.__name__,
    )
    network.confidence = measure
    policy = network.bind_policy(policy)
    test_images = torch.from_numpy(heldout.images)[test_idx]
    result = network.infer(test_images, policy)
    exits = result.exits.numpy()
    threshold = network.check_policy(policy)
    simulated = exit_index(outputs.confidences[measure.__name__][test_idx], threshold)
    early_masks = result.predictions.numpy()  # (T, H, W)
    full_masks = network.infer(test_images, math.inf).predictions.numpy()  # (T, H, W)
    test_masks = heldout.labels[test_idx]
    repeats = config.timing_repeats or (3 if config.quick else 7)
    timing = time_inference(network, test_images, threshold, batch_size=64, repeats=repeats)
    timing_batch1 = time_inference(
        network,
        test_images[: 20 if config.quick else 100],
        threshold,
        batch_size=1,
        repeats=max(1, repeats // 2),
    )
    miscoverage_test = float((early_masks != full_masks).mean(axis=(1, 2)).mean())
    summary = {
        "policy": f"{policy.procedure}, {RISK_TITLES[config.policy_risk]}, "
        f"ε = {policy.target_risk:g}, {measure.__name__} ≥ {threshold:.4g}",
        "certified": policy.certified,
        "test scenes": len(test_idx),
        "mean exit (1 = first)": float(exits.mean() + 1),
        "FLOPs speed-up": float(full_flops / exit_flops[exits].mean()),
        "measured speed-up, batch 64": timing["measured_speedup"],
        "measured speed-up, batch 1": timing_batch1["measured_speedup"],
        "full model ms/image, batch 64": timing["full_ms_per_image"],
        "early exit ms/image, batch 64": timing["early_exit_ms_per_image"],
        "test miscoverage (share of pixels unlike the full model)": miscoverage_test,
        "test pixel accuracy, full model": float((full_masks == test_masks).mean()),
        "test pixel accuracy, early exit": float((early_masks == test_masks).mean()),
        "real exits equal simulated exits": bool(np.array_equal(exits, simulated)),
    }
    return PolicyRun(
        policy, measure, test_idx, exits, early_masks, full_masks, result.probs, summary
    )


def picture_grid(prepared: Prepared, run: PolicyRun) -> list[dict[str, Any]]:
    """Step 4: a few test scenes, preferring ones that left at different exits."""
    heldout, n_exits = prepared.heldout, prepared.network.n_exits
    test_images = heldout.images[run.test_idx]
    test_masks = heldout.labels[run.test_idx]
    order = np.argsort(run.exits, kind="stable")
    shown = order[np.linspace(0, len(order) - 1, 6).round().astype(int)]
    n_classes = heldout.num_classes
    pixel = PIXEL_CONFIDENCES[run.measure.pixel]
    rows = []
    for i in shown:  # six scenes
        at_exit = pixel(run.probs[i : i + 1].unsqueeze(1).double())[0, 0]  # (H, W)
        rows.append(
            {
                "label": f"exit {int(run.exits[i]) + 1} of {n_exits}",
                "cells": [
                    {"image": test_images[i, 0].tolist(), "cmap": "gray", "vmin": 0.0, "vmax": 1.0},
                    _mask_cell(test_masks[i], n_classes),
                    _mask_cell(run.full_masks[i], n_classes),
                    _mask_cell(run.early_masks[i], n_classes),
                    {"image": at_exit.tolist(), "cmap": "viridis", "vmin": 0.0, "vmax": 1.0},
                ],
            }
        )
    return [
        {
            "file": "segmentation_examples.png",
            "title": "Test scenes: truth, full model, early exit",
            "caption": f"Masks coloured by class (black: background). Left at the exit named on "
            f"the row under the policy above; the last column is the per-pixel "
            f"{run.measure.pixel} confidence at that exit.",
            "columns": ["input", "true mask", "full model", "early exit", "confidence at exit"],
            "rows": rows,
        }
    ]


def run_demo(config: DemoConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or load) the segmenter, calibrate image-level exits, run them, write the report."""
    prepared = prepare(config, log=log)
    train, heldout, network = prepared.train, prepared.heldout, prepared.network
    outputs, measures, model_config = prepared.outputs, prepared.measures, prepared.model_config
    n_cal = _common(config, heldout)["n_cal"]
    risks = evaluate_risks(prepared, config)
    extra_tables = savings_tables(prepared, config, risks)
    run = run_policy(prepared, config)
    figures = picture_grid(prepared, run)
    timing = run.timing
    policy, exits, n_exits = run.policy, run.exits, network.n_exits
    exit_flops, full_flops = prepared.exit_flops, float(prepared.flops.full)
    base = measures[0].__name__  # top-1 + mean, the paper's default
    accuracy = outputs.pixel_accuracy.mean(axis=0)  # (L,)
    miou = outputs.miou.mean(axis=0)  # (L,)
    ucb = Evaluation.from_dict(risks[config.policy_risk]["evaluation"]).row(
        config.policy_procedure, config.policy_target_risk
    )
    vectors_table, vectors_line = pareto_side_by_side(prepared, config, n_cal)
    extra_tables = [*extra_tables, vectors_table]
    summary = [
        (
            f"{heldout.name}: a {n_exits}-exit encoder-decoder segmenter, held-out mIoU "
            f"{miou[0]:.3f} at the first exit and {miou[-1]:.3f} at the last (pixel accuracy "
            f"{accuracy[0]:.3f} / {accuracy[-1]:.3f})."
        ),
        (
            f"{config.policy_procedure} on {RISK_TITLES[config.policy_risk]} at ε = "
            f"{config.policy_target_risk:g}, δ = {config.delta:g}, n = {n_cal} ({base}): mean test "
            f"risk {ucb.mean_test_risk:.4f}, population violation rate "
            f"{ucb.population_violation_rate:.2f} over {config.trials} splits, "
            f"{100 * (ucb.relative_saving or 0):.1f}% of FLOPs saved."
        ),
        (
            f"Real inference at that policy: {timing['measured speed-up, batch 64']:.2f}x faster "
            f"at batch 64 and {timing['measured speed-up, batch 1']:.2f}x at batch 1 (FLOPs "
            f"ideal {timing['FLOPs speed-up']:.2f}x); test miscoverage "
            f"{timing['test miscoverage (share of pixels unlike the full model)']:.4f}."
        ),
        vectors_line,
    ]
    results: dict[str, Any] = {
        **results_header(
            "segmentation", f"exitguard: certified early exit for segmenting {heldout.name}"
        ),
        "summary": summary,
        "dataset": {
            "name": heldout.name,
            "source": heldout.source,
            "n_train": len(train),
            "n_heldout": len(heldout),
            "image_shape": list(heldout.image_shape),
            "classes": list(heldout.class_names),
        },
        "model": {
            "description": f"encoder-decoder: stage widths {list(model_config.widths)}, strides "
            f"{list(model_config.strides)}, dilations {list(model_config.dilations)}; a dense "
            f"head (1x1 conv, width {model_config.head_width}, then bilinear upsampling) per "
            f"stage; trained jointly with self-distillation ({prepared.training.epochs} epochs).",
            "n_exits": n_exits,
            "flops_per_exit": exit_flops.tolist(),
            "full_flops": full_flops,
            "accuracy_per_exit": miou.tolist(),
            "accuracy_label": "held-out mIoU",
            "pixel_accuracy_per_exit": accuracy.tolist(),
            "fingerprint": network.fingerprint,
            "from_cache": prepared.trained.from_cache,
            "train_seconds": prepared.trained.metadata.get("train_seconds"),
        },
        "settings": {
            "delta": config.delta,
            "n_cal": n_cal,
            "trials": config.trials,
            "target_risks": list(config.target_risks),
            "table_target_risks": list(TABLE_TARGET_RISKS),
            "procedures": list(config.procedures),
            "seed": config.seed,
            "confidence": base,
            "measures": [m.__name__ for m in measures],
        },
        "risk_titles": RISK_TITLES,
        "risks": risks,
        "tables": extra_tables,
        "figures": figures,
        "exit_histogram": {
            "risk": config.policy_risk,
            "procedure": config.policy_procedure,
            "target_risk": config.policy_target_risk,
            "threshold": policy.threshold,
            "counts": np.bincount(exits, minlength=n_exits).tolist(),
        },
        "timing": timing,
        "policy": policy.to_dict(),
    }
    write_report(results, Path(config.out))
    return results


def pareto_side_by_side(
    prepared: Prepared, config: DemoConfig, n_cal: int
) -> tuple[dict[str, Any], str]:
    """The policy's risk certified with one threshold and with per-exit thresholds."""
    from exitguard.pareto_evaluation import PerExitOutputs, side_by_side
    from exitguard.risk.exits import default_thresholds
    from exitguard.tasks.segmentation.collect import GRID_STEP

    outputs = prepared.outputs
    task = PerExitOutputs(
        name=prepared.heldout.name,
        confidences=outputs.confidences[prepared.measures[0].__name__],
        per_exit=dict(outputs.losses),
        loss_bounds=dict(LOSS_BOUNDS),
        exit_cost=prepared.exit_flops,
        head_cost=np.array(prepared.flops.head, dtype=np.float64),
        full_cost=float(prepared.flops.full),
        grid=default_thresholds(GRID_STEP),
    )
    return side_by_side(
        task,
        config.policy_risk,
        config.policy_target_risk,
        n_cal=n_cal,
        trials=min(10, config.trials) if config.quick else config.trials,
        delta=config.delta,
        seed=config.seed,
        quick=config.quick,
    )
