"""Semantic segmentation with risk-controlled image-level exits (the paper's Section 4.2).

A small encoder-decoder segmenter with four exits is trained on scenes of real items
(:mod:`exitguard.data.scenes`). Each exit's dense head decodes its features back to the input
resolution, so every exit gives a full mask. A whole image leaves at the first exit whose
*image-level* confidence (a per-pixel confidence aggregated over the image) reaches the
threshold, exactly as in classification; the four risks below are then controlled per image.

==========================  ==========================================================  ===
risk (the paper's name)     loss of exit ``e`` for one image, minus the last exit's      B
==========================  ==========================================================  ===
prediction_consistency      miscoverage R^C(y): share of pixels whose class differs       1
                            from the full model's
prediction_gap              mIoU gap R^G(y): (1 - mIoU_e) - (1 - mIoU_L) against the      1
                            ground truth
distribution_gap            mean-pixel Brier gap R^G(p) against the ground truth          2
distribution_consistency    mean-pixel Brier consistency R^C(p) against a label drawn     2
                            per pixel from the full model's distribution (seeded)
==========================  ==========================================================  ===

Per-image mIoU averages the IoU over the classes present in the prediction or in the true
mask (the background included); a class absent from both has no IoU (0/0) and is left out,
so an image is not rewarded for classes it does not contain. Since every pixel has a class,
at least one class is always present.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from exitguard.calibration import calibrate_table
from exitguard.data.images import ImageDataset, load_dataset
from exitguard.data.scenes import make_scenes, upscale
from exitguard.evaluation import Evaluation, evaluate
from exitguard.nn import (
    DenseHead,
    EarlyExitNetwork,
    FlopsTable,
    count_flops,
)
from exitguard.nn.blocks import BasicBlock
from exitguard.nn.confidence import AGGREGATIONS, PIXEL_CONFIDENCES, DenseConfidence
from exitguard.policy import ExitPolicy
from exitguard.report import write_report
from exitguard.risk.exits import exit_index, exit_indices
from exitguard.risk.losses import loss_table
from exitguard.tasks.common import (
    PROCEDURES,
    CachedModel,
    cached_model,
    evaluate_risk,
    model_description,
    progress_bar,
    results_header,
    time_inference,
    train_jointly,
)

RISK_TITLES = {
    "prediction_consistency": "miscoverage R^C(ŷ)",
    "prediction_gap": "mIoU gap R^G(ŷ)",
    "distribution_gap": "mean-pixel Brier gap R^G(p̂)",
    "distribution_consistency": "mean-pixel Brier consistency R^C(p̂)",
}
LOSS_BOUNDS = {
    "prediction_consistency": 1.0,
    "prediction_gap": 1.0,
    "distribution_gap": 2.0,
    "distribution_consistency": 2.0,
}
SEGMENTATION_RISKS = tuple(RISK_TITLES)
TARGET_RISKS = (*(round(0.01 * k, 2) for k in range(1, 21)), 0.25, 0.3)
TABLE_TARGET_RISKS = (0.01, 0.05, 0.1)
CACHE_FORMAT = "exitguard.segmenter/1"


# --------------------------------------------------------------------------- losses


def miscoverage(predictions: Tensor) -> Tensor:
    """Share of pixels whose class differs from the last exit's: (B, L, H, W) -> (B, L)."""
    return (predictions != predictions[:, -1:]).flatten(2).double().mean(dim=-1)


def mean_iou(predictions: Tensor, masks: Tensor, *, num_classes: int) -> Tensor:
    """Per-image mean IoU of every exit against the true mask: (B, L, H, W), (B, H, W) -> (B, L).

    The mean runs over the classes present in the prediction or in the mask; a class absent
    from both (IoU 0/0) is left out.
    """
    batch, n_exits = predictions.shape[:2]
    truth = masks.unsqueeze(1).expand_as(predictions)  # (B, L, H, W)
    image = torch.arange(batch * n_exits, device=predictions.device).view(batch, n_exits, 1, 1)
    cell = (image * num_classes + truth) * num_classes + predictions  # (B, L, H, W)
    confusion = torch.bincount(cell.flatten(), minlength=batch * n_exits * num_classes**2)
    confusion = confusion.view(batch, n_exits, num_classes, num_classes).double()  # [true, pred]
    intersection = confusion.diagonal(dim1=-2, dim2=-1)  # (B, L, C)
    union = confusion.sum(dim=-1) + confusion.sum(dim=-2) - intersection  # (B, L, C)
    present = union > 0
    iou = torch.where(present, intersection / union.clamp(min=1), 0.0)  # (B, L, C)
    return iou.sum(dim=-1) / present.sum(dim=-1)  # (B, L)


def mean_pixel_brier(probs: Tensor, labels: Tensor) -> Tensor:
    """Brier loss summed over classes, averaged over pixels: (B, L, C, H, W), (B, H, W) -> (B, L).

    In [0, 2].
    """
    squared = probs.square().sum(dim=2)  # (B, L, H, W)
    index = labels.unsqueeze(1).unsqueeze(2).expand(-1, probs.shape[1], 1, -1, -1)
    at_label = probs.gather(2, index).squeeze(2)  # (B, L, H, W)
    return (squared - 2.0 * at_label + 1.0).clamp(0.0, 2.0).flatten(2).mean(dim=-1)


def sample_pixel_labels(probs: Tensor, uniform: Tensor) -> Tensor:
    """One label per pixel drawn from ``probs`` by inverse CDF.

    Shapes: probs (B, C, H, W), uniform (B, H, W) -> labels (B, H, W).

    ``uniform`` holds the U(0, 1) draws, so the labels are fixed by whoever made them.
    """
    cumulative = probs.cumsum(dim=1)  # (B, C, H, W)
    target = uniform.unsqueeze(1) * cumulative[:, -1:]  # (B, 1, H, W)
    labels = (cumulative <= target).sum(dim=1)  # (B, H, W)
    return labels.clamp(max=probs.shape[1] - 1)


def per_exit_losses(
    probs: Tensor, masks: Tensor, uniform: Tensor, *, num_classes: int
) -> dict[str, Tensor]:
    """Absolute loss of every exit under the four risks: (B, L, C, H, W) -> {risk: (B, L)}.

    The table entry of a risk is the loss at the exit taken minus the last exit's (see
    :func:`exitguard.risk.losses.loss_table`); miscoverage is 0 at the last exit.
    """
    predictions = probs.max(dim=2).indices  # (B, L, H, W)
    pseudo = sample_pixel_labels(probs[:, -1], uniform)  # (B, H, W)
    return {
        "prediction_consistency": miscoverage(predictions),
        "prediction_gap": 1.0 - mean_iou(predictions, masks, num_classes=num_classes),
        "distribution_gap": mean_pixel_brier(probs.double(), masks),
        "distribution_consistency": mean_pixel_brier(probs.double(), pseudo),
    }


# --------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class SegmenterConfig:
    """An encoder-decoder segmenter: a strided encoder, dilated context blocks, dense exits.

    Stage 0 (stem and a stride-2 block) works at half resolution, stage 1 downsamples again,
    and the later stages widen the context with dilated blocks at a quarter of the input
    resolution. After every stage a dense head (a 1x1 hidden layer and a 1x1 classifier)
    decodes the features and upsamples the logits bilinearly to the input resolution.
    """

    in_channels: int = 1
    widths: tuple[int, ...] = (24, 48, 64, 64)
    strides: tuple[int, ...] = (2, 2, 1, 1)
    dilations: tuple[int, ...] = (1, 1, 2, 4)
    head_width: int = 32
    stem_width: int = 16

    def __post_init__(self) -> None:
        n = len(self.widths)
        if not (len(self.strides) == len(self.dilations) == n and 2 <= n <= 8):
            raise ValueError(
                "`widths`, `strides` and `dilations` must have the same length, 2 to 8 "
                f"stages; got {len(self.widths)}, {len(self.strides)}, {len(self.dilations)}."
            )


def build_segmenter(
    config: SegmenterConfig, *, image_shape: Sequence[int], num_classes: int
) -> EarlyExitNetwork:
    """The multi-exit segmenter of :class:`SegmenterConfig` as an :class:`EarlyExitNetwork`."""
    _, height, width = image_shape
    stages: list[nn.Module] = []
    heads: list[nn.Module] = []
    channels = config.stem_width
    for index, (out, stride, dilation) in enumerate(
        zip(config.widths, config.strides, config.dilations, strict=True)
    ):
        block = BasicBlock(channels, out, stride, dilation=dilation)
        if index == 0:
            stem = nn.Sequential(
                nn.Conv2d(config.in_channels, config.stem_width, 3, 1, 1, bias=False),
                nn.BatchNorm2d(config.stem_width),
                nn.ReLU(),
            )
            stages.append(nn.Sequential(stem, block))
        else:
            stages.append(block)
        heads.append(
            DenseHead(out, num_classes, hidden_channels=config.head_width, out_size=(height, width))
        )
        channels = out
    return EarlyExitNetwork(stages, heads, input_shape=tuple(image_shape))


@dataclasses.dataclass(frozen=True)
class SegmenterTraining:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    distill: float = 0.5
    seed: int = 0


def load_or_train(
    scenes: ImageDataset,
    *,
    model_config: SegmenterConfig,
    settings: SegmenterTraining,
    cache_dir: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> CachedModel[EarlyExitNetwork]:
    """Train the segmenter jointly (per-pixel cross-entropy with self-distillation), or load it."""

    def build() -> EarlyExitNetwork:
        return build_segmenter(
            model_config, image_shape=scenes.image_shape, num_classes=scenes.num_classes
        )

    def fit(network: EarlyExitNetwork) -> dict[str, Any]:
        return train_jointly(
            network, scenes.images, scenes.labels, settings=settings, progress=progress
        )

    description = model_description(
        CACHE_FORMAT,
        dataset=scenes.name,
        data_fingerprint=scenes.fingerprint,
        model=model_config,
        train=settings,
        architecture=build().fingerprint,
    )
    return cached_model(
        f"segmenter-{scenes.name}",
        description,
        build=build,
        train=fit,
        seed=settings.seed,
        cache_dir=cache_dir,
        log=log,
    )


# ----------------------------------------------------------------------- collection


def confidence_measures(*, q: float = 0.05, window: int = 16) -> tuple[DenseConfidence, ...]:
    """Every per-pixel confidence with every aggregation (the paper's Table 1 rows).

    The paper takes the 0.25-quantile on Cityscapes, where every pixel belongs to an object
    class. About 84% of a scene's pixels here are background, on which every exit is sure, so
    a quantile above the foreground share only sees background (the 0.25-quantile is then
    highest at the *first* exit); the default q = 0.05 looks at the items.
    """
    return tuple(
        DenseConfidence(pixel, aggregation, q=q, window=window)
        for pixel in PIXEL_CONFIDENCES
        for aggregation in AGGREGATIONS
    )


@dataclasses.dataclass(frozen=True, repr=False)
class SegmentationOutputs:
    """What the risk core needs from one pass over the held-out scenes.

    Attributes
    ----------
    confidences : dict of name -> array (n, L), float64
        Image-level confidence of every exit under each measure.
    losses : dict of risk -> array (n, L), float64
        Absolute loss of every exit under each risk (see :func:`per_exit_losses`).
    pixel_accuracy, miou : array (n, L)
        Per-image pixel accuracy and mIoU of every exit against the true mask.
    """

    confidences: dict[str, NDArray[np.float64]]
    losses: dict[str, NDArray[np.float64]]
    pixel_accuracy: NDArray[np.float64]
    miou: NDArray[np.float64]

    def __repr__(self) -> str:
        n, n_exits = self.pixel_accuracy.shape
        return (
            f"SegmentationOutputs(n={n}, n_exits={n_exits}, measures={list(self.confidences)}, "
            f"risks={list(self.losses)})"
        )


@torch.inference_mode()
def collect_segmentation(
    network: EarlyExitNetwork,
    scenes: ImageDataset,
    *,
    measures: Sequence[DenseConfidence],
    batch_size: int = 64,
    seed: int = 0,
) -> SegmentationOutputs:
    """Run every exit on every scene once; keep confidences and per-exit losses, not masks.

    The consistency pseudo-labels are drawn per pixel from the full model with U(0, 1)
    numbers of ``numpy.random.default_rng(seed)``, in scene order, so they do not depend on
    ``batch_size``.
    """
    network.eval()
    rng = np.random.default_rng(seed)
    n = len(scenes)
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, n, batch_size):
        images = torch.from_numpy(scenes.images[start : start + batch_size])  # (B, 1, H, W)
        masks = torch.from_numpy(scenes.labels[start : start + batch_size])  # (B, H, W)
        uniform = torch.from_numpy(rng.random(masks.shape))  # (B, H, W) float64
        probs = network(images).softmax(dim=2)  # (B, L, C, H, W)
        predictions = probs.max(dim=2).indices  # (B, L, H, W)
        batch = {f"conf:{measure.__name__}": measure(probs.double()) for measure in measures}
        batch.update(per_exit_losses(probs, masks, uniform, num_classes=scenes.num_classes))
        batch["pixel_accuracy"] = (predictions == masks.unsqueeze(1)).flatten(2).double().mean(-1)
        batch["miou"] = mean_iou(predictions, masks, num_classes=scenes.num_classes)
        for key, value in batch.items():
            parts.setdefault(key, []).append(value.double())
    arrays = {key: torch.cat(values).numpy() for key, values in parts.items()}
    return SegmentationOutputs(
        confidences={
            key.removeprefix("conf:"): arrays[key] for key in arrays if key.startswith("conf:")
        },
        losses={risk: arrays[risk] for risk in SEGMENTATION_RISKS},
        pixel_accuracy=arrays["pixel_accuracy"],
        miou=arrays["miou"],
    )


def default_grid(step: float = 0.002) -> NDArray[np.float64]:
    """``[inf, 1, 1 - step, ..., 0]``: finer than classification's, since image-level
    confidences of mostly-background scenes crowd near 1."""
    count = round(1.0 / step)
    return np.concatenate([[math.inf], np.linspace(1.0, 0.0, count + 1)])


def segmentation_tables(
    outputs: SegmentationOutputs,
    *,
    risk: str,
    measure: str,
    exit_flops: NDArray[np.float64],
    full_flops: float,
    thresholds: NDArray[np.float64] | None = None,
) -> dict[str, NDArray[Any]]:
    """Loss, FLOPs and exit tables (K, n) of one risk under one confidence measure.

    Row 0 (never exit early) runs no intermediate head, so it is charged ``full_flops``.
    """
    if risk not in outputs.losses:
        raise ValueError(f"`risk` must be one of {sorted(outputs.losses)}; got {risk!r}.")
    if measure not in outputs.confidences:
        raise ValueError(
            f"`measure` must be one of {sorted(outputs.confidences)}; got {measure!r}."
        )
    grid = default_grid() if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    exits = exit_indices(outputs.confidences[measure], grid)  # (K, n)
    losses = loss_table(outputs.losses[risk], exits)  # (K, n)
    cost = np.asarray(exit_flops, dtype=np.float64)[exits]  # (K, n)
    cost[0] = full_flops
    return {"losses": losses, "cost": cost, "exits": exits, "thresholds": grid}


# ------------------------------------------------------------------------------- demo


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


def run_demo(config: DemoConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or load) the segmenter, calibrate image-level exits, run them, write the report."""
    prepared = prepare(config, log=log)
    train, heldout, network = prepared.train, prepared.heldout, prepared.network
    outputs, measures, model_config = prepared.outputs, prepared.measures, prepared.model_config
    size = heldout.image_shape[-1]
    images = torch.from_numpy(heldout.images)
    exit_flops = prepared.exit_flops
    full_flops = float(prepared.flops.full)
    n_exits = network.n_exits
    base = measures[0].__name__  # top-1 + mean, the paper's default
    n_cal = min(config.n_cal, len(heldout) - 10)
    common: dict[str, Any] = dict(
        delta=config.delta, n_cal=n_cal, trials=config.trials, seed=config.seed
    )

    # The four risks with top-1 + mean, every procedure over the whole target grid.
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

    # Table 1: UCB-WSR on miscoverage for every confidence x aggregation.
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
    extra_tables = [
        {
            "title": "UCB-WSR savings on the miscoverage risk, per confidence and aggregation",
            "header": header,
            "rows": measure_rows,
            "note": f"Mean over {config.trials} splits, n_cal = {n_cal}, δ = {config.delta:g}. "
            "Layers saved: 1 − mean exit / number of exits; FLOPs saved against the backbone "
            f"alone. Quantile q = {config.quantile:g}; patch: minimum over the means of "
            f"{size // 4}x{size // 4} windows.",
        },
        {
            "title": "UCB-WSR savings for the four risks (top-1 confidence, mean aggregation)",
            "header": ["risk", *header[1:]],
            "rows": risk_rows,
            "note": "Brier risks have B = 2, the others B = 1.",
        },
    ]

    # One calibrated policy, run for real on the rest of the held-out scenes.
    cal_idx, test_idx = np.split(
        np.random.default_rng(config.seed + 1).permutation(len(heldout)), [n_cal]
    )
    policy_measure = measures[0]
    tables = prepared.tables(config.policy_risk, policy_measure.__name__)
    policy: ExitPolicy = calibrate_table(
        tables["losses"][:, cal_idx],
        target_risk=config.policy_target_risk,
        delta=config.delta,
        procedure=config.policy_procedure,
        loss_bound=LOSS_BOUNDS[config.policy_risk],
        cost=tables["cost"][:, cal_idx],
        thresholds=tables["thresholds"],
        risk=config.policy_risk,
        confidence=policy_measure.__name__,
    )
    network.confidence = policy_measure
    policy = network.bind_policy(policy)
    test_images = images[test_idx]
    result = network.infer(test_images, policy)
    exits = result.exits.numpy()
    threshold = network.check_policy(policy)
    simulated = exit_index(outputs.confidences[policy_measure.__name__][test_idx], threshold)
    full = network.infer(test_images, math.inf)
    early_masks = result.predictions.numpy()  # (T, H, W)
    full_masks = full.predictions.numpy()  # (T, H, W)
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
    timing_summary = {
        "policy": f"{policy.procedure}, {RISK_TITLES[config.policy_risk]}, "
        f"ε = {policy.target_risk:g}, {policy_measure.__name__} ≥ {threshold:.4g}",
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

    # Picture grid: a few test scenes, preferring ones that left at different exits.
    order = np.argsort(exits, kind="stable")
    shown = order[np.linspace(0, len(order) - 1, 6).round().astype(int)]
    n_classes = heldout.num_classes
    pixel = PIXEL_CONFIDENCES[policy_measure.pixel]
    rows = []
    for i in shown:
        at_exit = pixel(result.probs[i : i + 1].unsqueeze(1).double())[0, 0]  # (H, W)
        rows.append(
            {
                "label": f"exit {int(exits[i]) + 1} of {n_exits}",
                "cells": [
                    {"image": test_images[i, 0].tolist(), "cmap": "gray", "vmin": 0.0, "vmax": 1.0},
                    _mask_cell(test_masks[i], n_classes),
                    _mask_cell(full_masks[i], n_classes),
                    _mask_cell(early_masks[i], n_classes),
                    {"image": at_exit.tolist(), "cmap": "viridis", "vmin": 0.0, "vmax": 1.0},
                ],
            }
        )
    figures = [
        {
            "file": "segmentation_examples.png",
            "title": "Test scenes: truth, full model, early exit",
            "caption": f"Masks coloured by class (black: background). Left at the exit named on "
            f"the row under the policy above; the last column is the per-pixel "
            f"{policy_measure.pixel} confidence at that exit.",
            "columns": ["input", "true mask", "full model", "early exit", "confidence at exit"],
            "rows": rows,
        }
    ]

    accuracy = outputs.pixel_accuracy.mean(axis=0)  # (L,)
    miou = outputs.miou.mean(axis=0)  # (L,)
    ucb = Evaluation.from_dict(risks[config.policy_risk]["evaluation"]).row(
        config.policy_procedure, config.policy_target_risk
    )
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
            f"Real inference at that policy: {timing['measured_speedup']:.2f}x faster at batch 64 "
            f"and {timing_batch1['measured_speedup']:.2f}x at batch 1 (FLOPs ideal "
            f"{timing_summary['FLOPs speed-up']:.2f}x); test miscoverage {miscoverage_test:.4f}."
        ),
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
        "timing": timing_summary,
        "policy": policy.to_dict(),
    }
    write_report(results, Path(config.out))
    return results
