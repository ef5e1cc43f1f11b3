"""The segmentation demo: train or load, calibrate every risk, run a policy, write the report."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from exitguard.calibration import calibrate_table
from exitguard.data.images import ImageDataset, load_dataset
from exitguard.data.scenes import make_scenes, upscale
from exitguard.evaluation import Evaluation, EvaluationRow
from exitguard.nn import (
    EarlyExitNetwork,
    FlopsTable,
    count_flops,
    optimize_for_inference,
    profile_latency,
)
from exitguard.nn.confidence import PIXEL_CONFIDENCES, DenseConfidence
from exitguard.policy import ExitPolicy
from exitguard.report.plots import class_colours
from exitguard.report.results import (
    DemoResults,
    GridCell,
    GridRow,
    LegendEntry,
    ModelInfo,
    PictureGrid,
    RiskResult,
    Table,
    TimedPolicy,
    summary_lines,
)
from exitguard.risk.exits import exit_index
from exitguard.tasks.common import (
    TARGET_RISKS,  # noqa: F401  (the package exports the demo's grid)
    CachedModel,
    ImageOptions,
    PolicyOptions,
    ServesTrained,
    calibration_split,
    demo_settings,
    evaluate_risk,
    image_dataset_info,
    progress_bar,
    results_header,
    table_writer,
    time_policy,
    timed_policy,
    write_demo_report,
)
from exitguard.tasks.common import evaluate_risks as evaluate_risks_of
from exitguard.tasks.segmentation.collect import (
    SegmentationOutputs,
    collect_segmentation,
    confidence_measures,
    segmentation_tables,
)
from exitguard.tasks.segmentation.losses import (
    LOSS_BOUNDS,
    RISK_NOTES,
    RISK_TITLES,
    SEGMENTATION_RISKS,
)
from exitguard.tasks.segmentation.model import (
    SegmenterConfig,
    SegmenterTraining,
    load_or_train,
)

TABLE_TARGET_RISKS = (0.01, 0.05, 0.1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoConfig(ImageOptions, PolicyOptions):
    """Settings of :func:`run_demo` (``dataset`` names where the items come from; the shared
    settings: :class:`~exitguard.tasks.common.DemoOptions`).

    ``quantile`` is the q of the quantile aggregation (see :func:`confidence_measures`).
    """

    out: str = "exitguard-report/segmentation"
    n_cal: int = 400
    policy_risk: str = "prediction_consistency"
    quantile: float = 0.05
    n_train: int | None = None
    n_heldout: int | None = None
    epochs: int | None = None

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
        training = SegmenterTraining(epochs=5 if config.quick else 24, lr_schedule="cosine")
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
class Prepared(ServesTrained):
    """A trained segmenter with its per-exit confidences and losses on the held-out scenes."""

    train: ImageDataset
    heldout: ImageDataset
    trained: CachedModel[EarlyExitNetwork]
    model_config: SegmenterConfig
    training: SegmenterTraining
    measures: tuple[DenseConfidence, ...]
    outputs: SegmentationOutputs
    flops: FlopsTable
    served: EarlyExitNetwork | None = None

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
    network, _ = optimize_for_inference(trained.module)  # the same outputs, faster on CPU
    outputs = collect_segmentation(network, heldout, measures=measures, seed=config.seed)
    flops = count_flops(trained.module, torch.from_numpy(heldout.images[:1]))
    return Prepared(
        train,
        heldout,
        trained,
        model_config,
        setup.training,
        measures,
        outputs,
        flops,
        served=network,
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
    progress: bool = False,
) -> dict[str, dict[str, Evaluation]]:
    """The paper's Table 1: one procedure on one risk for every confidence x aggregation.

    Returns ``{measure: {"flops": Evaluation, "exits": Evaluation}}``; the FLOPs evaluation's
    ``relative_saving`` is the FLOPs saving.
    ``measures`` names the measures to evaluate (all of ``prepared.measures`` by default).
    The exits evaluation's ``mean_cost`` is the mean 0-based exit.
    """
    found = {}
    names = [m.__name__ for m in prepared.measures] if measures is None else list(measures)
    for name in progress_bar(names, enabled=progress, desc="confidence measures"):
        tables = prepared.tables(risk, name)
        evaluated = evaluate_risk(
            tables["losses"],
            cost=tables["cost"],
            exits=tables["exits"],
            loss_bound=LOSS_BOUNDS[risk],
            title=RISK_TITLES[risk],
            procedures=(procedure,),
            target_risks=tuple(target_risks),
            delta=delta,
            n_cal=n_cal,
            trials=trials,
            seed=seed,
        )
        found[name] = {"flops": evaluated.evaluation, "exits": evaluated.evaluation_exits}
    return found


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _layers_saved(row_exits: EvaluationRow, n_exits: int) -> float | None:
    """1 − (mean 0-based exit + 1) / number of exits: the share of exits not evaluated."""
    return None if row_exits.mean_cost is None else 1.0 - (row_exits.mean_cost + 1.0) / n_exits


def _saving_cells(by_flops: Evaluation, by_exit: Evaluation, eps: float, n_exits: int) -> list[str]:
    """Layers saved, FLOPs saved and mean test risk of UCB-WSR at ``eps``."""
    row = by_flops.row("ucb-wsr", eps)
    return [
        _percent(_layers_saved(by_exit.row("ucb-wsr", eps), n_exits)),
        _percent(row.relative_saving),
        f"{row.mean_test_risk:.4f}",
    ]


def _mask_cell(mask: NDArray[Any], n_classes: int) -> GridCell:
    return GridCell(image=mask.astype(np.float64), cmap=MASK_CMAP, vmin=0, vmax=n_classes - 1)


def _common(config: DemoConfig, heldout: ImageDataset) -> dict[str, Any]:
    n_cal = min(config.n_cal, len(heldout) - 10)
    return dict(delta=config.delta, n_cal=n_cal, trials=config.trials, seed=config.seed)


def background_share(heldout: ImageDataset) -> float:
    """Share of the held-out pixels that are background (class 0) in the true masks."""
    return float(np.mean(heldout.labels == 0))


def evaluate_risks(prepared: Prepared, config: DemoConfig) -> dict[str, RiskResult]:
    """Step 1: every risk with top-1 + mean, every procedure over the whole target grid."""
    common = _common(config, prepared.heldout)
    share = background_share(prepared.heldout)

    def note(risk: str) -> str:
        if risk != "prediction_consistency":
            return RISK_NOTES[risk]
        return RISK_NOTES[risk] + (
            f" {100 * share:.0f}% of the held-out pixels are background, on which every exit "
            "agrees with the full model, so this risk is dominated by background: an exit "
            "can get the objects badly wrong while the guarantee holds. The foreground "
            "miscoverage below counts the object pixels only."
        )

    return evaluate_risks_of(
        SEGMENTATION_RISKS,
        prepared.tables,
        options=config,
        n_cal=common["n_cal"],
        trials=config.trials,
        loss_bound=LOSS_BOUNDS.__getitem__,
        title=RISK_TITLES.__getitem__,
        note=note,
    )


def risk_files(prepared: Prepared) -> dict[str, Any]:
    """The loss table of every risk (top-1 + mean confidence) as ``table_<risk>.npz`` writers."""
    measure = prepared.measures[0].__name__
    return {
        f"table_{risk}.npz": table_writer(
            prepared.tables(risk),
            loss_bound=LOSS_BOUNDS[risk],
            risk=risk,
            model=prepared.network,
            confidence=measure,
        )
        for risk in SEGMENTATION_RISKS
    }


def savings_tables(
    prepared: Prepared, config: DemoConfig, risks: dict[str, RiskResult]
) -> list[Table]:
    """Step 2: Table 1 (UCB-WSR per confidence x aggregation) and every risk's savings."""
    common = _common(config, prepared.heldout)
    size = prepared.heldout.image_shape[-1]
    n_exits = prepared.network.n_exits
    table_eps = TABLE_TARGET_RISKS
    header = ["confidence / aggregation"] + [
        f"ε = {eps:g}: {what}"
        for eps in table_eps
        for what in ("layers saved", "FLOPs saved", "test risk")
    ]
    per_measure = table_one(prepared, target_risks=table_eps, progress=config.progress, **common)
    measure_rows = [
        [name]
        + [
            cell
            for eps in table_eps
            for cell in _saving_cells(ev["flops"], ev["exits"], eps, n_exits)
        ]
        for name, ev in per_measure.items()
    ]
    risk_rows = [
        [RISK_TITLES[risk]]
        + [
            cell
            for eps in table_eps
            for cell in _saving_cells(data.evaluation, data.evaluation_exits, eps, n_exits)
        ]
        for risk, data in risks.items()
    ]
    return [
        Table(
            title="UCB-WSR savings on the pixel miscoverage risk, per confidence and aggregation",
            header=tuple(header),
            rows=tuple(tuple(row) for row in measure_rows),
            note=f"Mean over {config.trials} splits, n_cal = {common['n_cal']}, "
            f"δ = {config.delta:g}. Layers saved: 1 − (mean exit + 1) / number of exits; FLOPs "
            f"saved against the backbone alone. Quantile q = {config.quantile:g}; patch: minimum "
            f"over the means of {size // 4}x{size // 4} windows.",
        ),
        Table(
            title="UCB-WSR savings for every risk (top-1 confidence, mean aggregation)",
            header=("risk", *header[1:]),
            rows=tuple(tuple(row) for row in risk_rows),
            note="Brier risks have B = 2, the others B = 1. Pixel miscoverage is dominated by "
            "background pixels; the foreground miscoverage is the stricter promise.",
        ),
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
    timed: TimedPolicy


def run_policy(prepared: Prepared, config: DemoConfig) -> PolicyRun:
    """Step 3: calibrate one policy, run it with real skipping, time it against the full model."""
    heldout, network, outputs = prepared.heldout, prepared.network, prepared.outputs
    n_cal = _common(config, heldout)["n_cal"]
    exit_flops, full_flops = prepared.exit_flops, float(prepared.flops.full)
    cal_idx, test_idx = calibration_split(len(heldout), n_cal, seed=config.seed)
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
    profile = profile_latency(network, test_images[:64], batch_sizes=(1, 64), repeats=5)
    speeds = time_policy(
        network,
        test_images,
        threshold,
        batch_size=64,
        batch1_images=20 if config.quick else 100,
        repeats=config.timing_repeats or (3 if config.quick else 7),
        progress=config.progress,
        profile=profile,
    )
    pixel_miss = float((early_masks != full_masks).mean(axis=(1, 2)).mean())
    objects = (early_masks != 0) | (full_masks != 0)  # (T, H, W)
    foreground_miss = float(
        (
            (early_masks != full_masks).sum(axis=(1, 2)) / np.maximum(objects.sum(axis=(1, 2)), 1)
        ).mean()
    )
    timed = timed_policy(
        policy,
        exits,
        n_exits=network.n_exits,
        flops_saving=1.0 - float(exit_flops[exits].mean()) / full_flops,
        n_cal=len(cal_idx),
        unit="scenes",
        speeds=speeds,
        measures=[
            ("confidence", f"{measure.__name__} ≥ {threshold:.4g}"),
            ("test pixel miscoverage (share of pixels unlike the full model)", pixel_miss),
            ("test foreground miscoverage (share of object pixels unlike it)", foreground_miss),
            ("test pixel accuracy, full model", float((full_masks == test_masks).mean())),
            ("test pixel accuracy, early exit", float((early_masks == test_masks).mean())),
            ("real exits equal simulated exits", bool(np.array_equal(exits, simulated))),
        ],
        quality=f"test pixel miscoverage {pixel_miss:.4f}, foreground miscoverage "
        f"{foreground_miss:.4f}",
    )
    return PolicyRun(policy, measure, test_idx, exits, early_masks, full_masks, result.probs, timed)


MASK_CMAP = "nipy_spectral"
"""Colour map of the masks: class 0 (background) is black."""


def picture_grid(prepared: Prepared, run: PolicyRun) -> list[PictureGrid]:
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
        exit_taken = int(run.exits[i])
        rows.append(
            GridRow(
                label=f"exit {exit_taken}" + (" (full)" if exit_taken == n_exits - 1 else ""),
                cells=(
                    GridCell(image=test_images[i, 0].astype(np.float64), vmin=0.0, vmax=1.0),
                    _mask_cell(test_masks[i], n_classes),
                    _mask_cell(run.full_masks[i], n_classes),
                    _mask_cell(run.early_masks[i], n_classes),
                    GridCell(image=at_exit.numpy(), cmap="viridis", vmin=0.0, vmax=1.0),
                ),
            )
        )
    colours = class_colours(n_classes, cmap=MASK_CMAP)
    return [
        PictureGrid(
            file="segmentation_examples.png",
            title="Test scenes: truth, full model, early exit",
            caption=f"Masks coloured by class (legend under the grid; black: background). Each "
            f"row left at the exit named on its left (0-based; exit {n_exits - 1} is the full "
            f"model) under the policy above; the last column is the per-pixel "
            f"{run.measure.pixel} confidence at that exit (colour bar on the right). Objects "
            f"cover few pixels: an early exit can get them badly wrong while its pixel "
            f"miscoverage stays small, which the foreground miscoverage shows.",
            columns=("input", "true mask", "full model", "early exit", "confidence at exit"),
            rows=tuple(rows),
            colorbar=f"{run.measure.pixel} confidence at the exit taken",
            legend=tuple(
                LegendEntry(label=name, color=colour)
                for name, colour in zip(heldout.class_names, colours, strict=True)
            ),
        )
    ]


def run_demo(config: DemoConfig, *, log: Callable[[str], None] = print) -> DemoResults:
    """Train (or load) the segmenter, calibrate image-level exits, run them, write the report.

    Beside the report it saves every risk's loss table (``table_<risk>.npz``, top-1 + mean
    confidence) and the timed policy (``policy.json``).
    """
    prepared = prepare(config, log=log)
    train, heldout, network = prepared.train, prepared.heldout, prepared.network
    outputs, measures, model_config = prepared.outputs, prepared.measures, prepared.model_config
    n_cal = _common(config, heldout)["n_cal"]
    log("calibrating every risk over repeated splits")
    risks = evaluate_risks(prepared, config)
    log("Table 1: every confidence measure and aggregation")
    extra_tables = savings_tables(prepared, config, risks)
    log(
        "running one calibrated policy for real: profiling the latency of every stage and exit "
        "head, then timing the policy against the full model"
    )
    run = run_policy(prepared, config)
    figures = picture_grid(prepared, run)
    policy, n_exits = run.policy, network.n_exits
    exit_flops, full_flops = prepared.exit_flops, float(prepared.flops.full)
    base = measures[0].__name__  # top-1 + mean, the paper's default
    accuracy = outputs.pixel_accuracy.mean(axis=0)  # (L,)
    miou = outputs.miou.mean(axis=0)  # (L,)
    settings = demo_settings(
        config,
        n_cal=n_cal,
        trials=config.trials,
        table_target_risks=TABLE_TARGET_RISKS,
        confidence=base,
        extra={"measures": [m.__name__ for m in measures]},
    )
    log("per-exit thresholds (Pareto Testing) beside the single threshold")
    vectors_table, vectors_line = pareto_side_by_side(prepared, config, n_cal)
    extra_tables = [*extra_tables, Table.from_dict(vectors_table, "tables[-1]")]
    share = background_share(heldout)
    summary = (
        (
            f"{heldout.name}: a {n_exits}-exit encoder-decoder segmenter (exits 0 to "
            f"{n_exits - 1}), held-out mIoU {miou[0]:.3f} at exit 0 and {miou[-1]:.3f} at exit "
            f"{n_exits - 1}, the full model (pixel accuracy {accuracy[0]:.3f} / "
            f"{accuracy[-1]:.3f})."
        ),
        *summary_lines(risks, settings, run.timed),
        vectors_line,
        (
            f"Pixel miscoverage counts every pixel and {100 * share:.0f}% of the pixels are "
            "background, on which every exit agrees with the full model, so it is dominated by "
            "background; the foreground miscoverage counts the object pixels only (see its "
            "table)."
        ),
    )
    results = DemoResults(
        task="segmentation",
        title=f"exitguard: certified early exit for segmenting {heldout.name}",
        summary=summary,
        dataset=image_dataset_info(
            heldout,
            n_train=len(train),
            n_heldout=len(heldout),
            unit="scenes",
            note=f"{100 * share:.0f}% of the held-out pixels are background",
            extra={"background_share": share},
        ),
        model=ModelInfo(
            description=f"encoder-decoder: stage widths {list(model_config.widths)}, strides "
            f"{list(model_config.strides)}, dilations {list(model_config.dilations)}; a dense "
            f"head (1x1 conv, width {model_config.head_width}) per stage, deciding at a quarter "
            "of the input resolution; only the scenes that leave are upsampled bilinearly; "
            f"trained jointly with self-distillation ({prepared.training.epochs} epochs).",
            n_exits=n_exits,
            flops_per_exit=tuple(exit_flops.tolist()),
            full_flops=full_flops,
            accuracy_per_exit=tuple(miou.tolist()),
            accuracy_label="held-out mIoU",
            fingerprint=network.fingerprint,
            from_cache=prepared.trained.from_cache,
            train_seconds=prepared.trained.metadata.get("train_seconds"),
            extra={"pixel_accuracy_per_exit": accuracy.tolist()},
        ),
        settings=settings,
        risks=risks,
        timed=run.timed,
        policy=policy.to_dict(),
        tables=tuple(extra_tables),
        figures=tuple(figures),
        **results_header(),
    )
    write_demo_report(results, config, policy=policy, files=risk_files(prepared), log=log)
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
