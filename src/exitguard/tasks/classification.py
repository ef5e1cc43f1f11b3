"""Image classification end to end: train (or load) a multi-exit CNN, calibrate, measure, report.

The main job of the project (``exitguard demo``): per-exit outputs are collected once on
held-out data, the paper's four risks are calibrated with naive, CRC, UCB-WSR and LTT over a
grid of target risks and checked on repeated random splits, and one calibrated policy is run
for real against the full model.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

import exitguard
from exitguard.calibration import build_table, calibrate
from exitguard.data.images import ImageDataset, load_dataset
from exitguard.nn import (
    ClassifierHead,
    EarlyExitNetwork,
    ExitOutputs,
    FlopsTable,
    collect,
    count_flops,
)
from exitguard.nn.blocks import BasicBlock
from exitguard.report import write_report
from exitguard.risk.exits import exit_index
from exitguard.risk.losses import RISKS
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

if TYPE_CHECKING:
    from exitguard.distributed.options import RaySettings

TARGET_RISKS = (*(round(0.01 * k, 2) for k in range(1, 21)), 0.25, 0.3)
TABLE_TARGET_RISKS = (0.01, 0.02, 0.05, 0.1, 0.2)
CACHE_FORMAT = "exitguard.classifier/1"


# --------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class CNNConfig:
    """A ResNet-style CNN for small grey images: a stem, then one block per stage.

    Each stage is followed by an exit; the last exit is the full model.
    """

    in_channels: int = 1
    num_classes: int = 10
    widths: tuple[int, ...] = (16, 32, 48, 64, 96)
    strides: tuple[int, ...] = (1, 2, 1, 2, 1)
    drop_rate: float = 0.1

    def __post_init__(self) -> None:
        if len(self.widths) != len(self.strides) or not 2 <= len(self.widths) <= 8:
            raise ValueError(
                "`widths` and `strides` must have the same length, 2 to 8 stages; got "
                f"{len(self.widths)} and {len(self.strides)}."
            )


def build_classifier(config: CNNConfig, *, image_shape: Sequence[int]) -> EarlyExitNetwork:
    """The multi-exit CNN of :class:`CNNConfig` as an :class:`EarlyExitNetwork`."""
    stages: list[nn.Module] = []
    heads: list[nn.Module] = []
    channels = config.in_channels
    for index, (width, stride) in enumerate(zip(config.widths, config.strides, strict=True)):
        block = BasicBlock(channels, width, stride)
        if index == 0:
            stem = nn.Sequential(
                nn.Conv2d(config.in_channels, width, 3, 1, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
            )
            block = BasicBlock(width, width, stride)
            stages.append(nn.Sequential(stem, block))
        else:
            stages.append(block)
        heads.append(ClassifierHead(width, config.num_classes, drop_rate=config.drop_rate))
        channels = width
    return EarlyExitNetwork(stages, heads, input_shape=tuple(image_shape))


# --------------------------------------------------------------------- training + cache


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    epochs: int = 12
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    distill: float = 0.5
    seed: int = 0
    max_train: int | None = None


def load_or_train(
    train: ImageDataset,
    *,
    model_config: CNNConfig,
    settings: TrainSettings,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> CachedModel[EarlyExitNetwork]:
    """Train the classifier, or reuse a cached one trained on the same data with the same setup.

    See :func:`exitguard.tasks.common.cached_model` for the cache entry and its checks.
    """

    def build() -> EarlyExitNetwork:
        return build_classifier(model_config, image_shape=train.image_shape)

    def fit(network: EarlyExitNetwork) -> dict[str, Any]:
        images, labels = train.images, train.labels
        if settings.max_train is not None:
            images, labels = images[: settings.max_train], labels[: settings.max_train]
        return train_jointly(network, images, labels, settings=settings, progress=progress)

    description = model_description(
        CACHE_FORMAT,
        dataset=train.name,
        data_fingerprint=train.fingerprint,
        model=model_config,
        train=settings,
        architecture=build().fingerprint,
    )
    return cached_model(
        f"classifier-{train.name}",
        description,
        build=build,
        train=fit,
        seed=settings.seed,
        cache_dir=cache_dir,
        log=log,
    )


# ------------------------------------------------------------------------------- demo


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Settings of :func:`run_demo`."""

    dataset: str = "digits"
    dataset_path: str | None = None
    out: str = "exitguard-report/classification"
    seed: int = 0
    n_cal: int = 100
    trials: int = 100
    delta: float = 0.1
    procedures: tuple[str, ...] = PROCEDURES
    target_risks: tuple[float, ...] = TARGET_RISKS
    policy_risk: str = "prediction_gap"
    policy_procedure: str = "ucb-wsr"
    policy_target_risk: float = 0.05
    quick: bool = False
    progress: bool = True
    cache_dir: str | None = None
    epochs: int | None = None
    timing_repeats: int | None = None
    ray: RaySettings | None = None  # collect the held-out outputs on Ray


def _split(n: int, n_heldout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_heldout:]), np.sort(order[:n_heldout])


def classifier_data(
    dataset: str, *, path: str | None = None, seed: int = 0
) -> tuple[ImageDataset, ImageDataset, ImageDataset]:
    """(full dataset, training part, held-out part) as the classification demo splits them.

    Fashion-MNIST keeps its own split (60000 / 10000); the others are split at random by
    ``seed`` (half held out for digits, 40% for MNIST-5k).
    """
    data = load_dataset(dataset, path=path)
    if dataset == "fashion-mnist":
        n_train = 60000
        train = data.subset(np.arange(n_train))
        heldout = data.subset(np.arange(n_train, len(data)))
    else:
        fraction = 0.5 if dataset == "digits" else 0.4
        train_idx, held_idx = _split(len(data), int(len(data) * fraction), seed)
        train, heldout = data.subset(train_idx), data.subset(held_idx)
    return data, train, heldout


def classifier_settings(
    dataset: str, *, quick: bool = False, seed: int = 0
) -> tuple[CNNConfig, TrainSettings]:
    """The CNN and its training for a dataset, as the classification demo uses them."""
    if dataset == "fashion-mnist":
        model = CNNConfig(widths=(24, 32, 48, 64, 96), strides=(1, 2, 1, 2, 1))
        train = TrainSettings(epochs=3 if quick else 6, batch_size=128, lr=2e-3)
    elif dataset == "mnist-5k":
        model = CNNConfig()
        train = TrainSettings(epochs=4 if quick else 10)
    else:
        # Thin early stages: on 8x8 digits a wide first stage already sees the whole image.
        model = CNNConfig(widths=(8, 12, 16, 32, 64), strides=(1, 1, 2, 1, 2))
        train = TrainSettings(epochs=4 if quick else 15)
    return model, dataclasses.replace(train, seed=seed)


@dataclasses.dataclass(frozen=True, repr=False)
class Prepared:
    """A trained network with its per-exit outputs on the held-out data."""

    data: ImageDataset
    train: ImageDataset
    heldout: ImageDataset
    trained: CachedModel[EarlyExitNetwork]
    model_config: CNNConfig
    settings: TrainSettings
    outputs: ExitOutputs
    flops: FlopsTable

    @property
    def network(self) -> EarlyExitNetwork:
        return self.trained.module

    @property
    def exit_flops(self) -> np.ndarray:
        """(L,) FLOPs of a sample that leaves at each exit (heads on the way included)."""
        return self.flops.to_exit.astype(np.float64)


def prepare(config: DemoConfig, *, log: Callable[[str], None] = print) -> Prepared:
    """Load the data, train or load the model, and collect every exit's held-out outputs."""
    data, train, heldout = classifier_data(
        config.dataset, path=config.dataset_path, seed=config.seed
    )
    model_config, settings = classifier_settings(
        config.dataset, quick=config.quick, seed=config.seed
    )
    if config.epochs is not None:
        settings = dataclasses.replace(settings, epochs=config.epochs)
    log(f"data: {data!r}; {len(train)} training and {len(heldout)} held-out images")
    trained = load_or_train(
        train,
        model_config=model_config,
        settings=settings,
        cache_dir=Path(config.cache_dir) if config.cache_dir else None,
        progress=config.progress,
        log=log,
    )
    log("model: " + ("loaded from cache" if trained.from_cache else "trained and cached"))
    images = torch.from_numpy(heldout.images)
    if config.ray is None:
        outputs = collect(trained.module, images, labels=heldout.labels, batch_size=256)
    else:  # the same batches on Ray workers: the same outputs, bit for bit
        from exitguard.distributed import collect as collect_on_ray
        from exitguard.distributed.models import classifier_payload

        payload = classifier_payload(trained.module, model_config, image_shape=train.image_shape)
        outputs = collect_on_ray(
            payload,
            heldout.images,
            labels=heldout.labels,
            batch_size=256,
            progress=config.progress,
            log=log,
            **config.ray.run_options(),
        )
    flops = count_flops(trained.module, images[:1])
    return Prepared(data, train, heldout, trained, model_config, settings, outputs, flops)


def risk_tables(prepared: Prepared, risk: str, *, seed: int) -> dict[str, np.ndarray]:
    """Loss table and FLOPs cost table of one risk over the default threshold grid."""
    tables = build_table(
        prepared.outputs.probs,
        prepared.heldout.labels,
        risk=risk,
        exit_cost=prepared.exit_flops,
        rng=seed,
    )
    # The never-exit row runs no intermediate head: charge it the backbone alone.
    tables["cost"][0] = float(prepared.flops.full)
    return tables


def run_demo(config: DemoConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the classification main job and write its report; returns the results dict."""
    prepared = prepare(config, log=log)
    data, train, heldout = prepared.data, prepared.train, prepared.heldout
    network, trained, flops = prepared.network, prepared.trained, prepared.flops
    model_config, settings, outputs = prepared.model_config, prepared.settings, prepared.outputs
    images = torch.from_numpy(heldout.images)
    exit_flops = prepared.exit_flops
    accuracy = (outputs.probs.argmax(-1) == heldout.labels[:, None]).mean(axis=0)  # (L,)

    trials = config.trials
    risks: dict[str, Any] = {}
    for risk in progress_bar(RISKS, enabled=config.progress, desc="calibrating risks"):
        tables = risk_tables(prepared, risk, seed=config.seed)
        risks[risk] = evaluate_risk(
            tables["losses"],
            cost=tables["cost"],
            exits=tables["exits"],
            loss_bound=2.0 if risk.startswith("distribution") else 1.0,
            procedures=config.procedures,
            target_risks=config.target_risks,
            delta=config.delta,
            n_cal=config.n_cal,
            trials=trials,
            seed=config.seed,
        )

    # One calibrated policy, run for real on the rest of the held-out data.
    cal_idx, test_idx = np.split(
        np.random.default_rng(config.seed + 1).permutation(len(heldout)), [config.n_cal]
    )
    policy = calibrate(
        outputs.probs[cal_idx],
        heldout.labels[cal_idx],
        risk=config.policy_risk,
        target_risk=config.policy_target_risk,
        delta=config.delta,
        procedure=config.policy_procedure,
        exit_cost=exit_flops,
        rng=config.seed,
    ).with_model(
        n_exits=network.n_exits,
        model_fingerprint=network.fingerprint,
        confidence=network.confidence,
    )
    test_images = images[test_idx]
    result = network.infer(test_images, policy)
    simulated = exit_index(outputs.confidences[test_idx], float(policy.threshold))
    exits = result.exits.numpy()
    predictions = result.predictions.numpy()
    test_labels = heldout.labels[test_idx]
    full_predictions = outputs.probs[test_idx, -1].argmax(-1)
    repeats = config.timing_repeats or (3 if config.quick else 7)
    timing = time_inference(
        network, test_images, float(policy.threshold), batch_size=256, repeats=repeats
    )
    timing_batch1 = time_inference(
        network,
        test_images[:200],
        float(policy.threshold),
        batch_size=1,
        repeats=max(1, repeats // 2),
    )
    full_only = float(flops.full)
    timing_summary = {
        "policy": f"{policy.procedure}, {policy.risk}, ε = {policy.target_risk:g}, "
        f"threshold = {policy.threshold:.3g}",
        "certified": policy.certified,
        "test images": len(test_idx),
        "mean exit (1 = first)": float(exits.mean() + 1),
        "FLOPs speed-up": float(full_only / exit_flops[exits].mean()),
        "measured speed-up, batch 256": timing["measured_speedup"],
        "measured speed-up, batch 1": timing_batch1["measured_speedup"],
        "full model ms/image, batch 256": timing["full_ms_per_image"],
        "early exit ms/image, batch 256": timing["early_exit_ms_per_image"],
        "test accuracy, full model": float((full_predictions == test_labels).mean()),
        "test accuracy, early exit": float((predictions == test_labels).mean()),
        "test risk (accuracy drop)": float(
            (predictions != test_labels).mean() - (full_predictions != test_labels).mean()
        ),
        "real exits equal simulated exits": bool(np.array_equal(exits, simulated)),
    }
    eps_shown = config.policy_target_risk
    ucb = exitguard.Evaluation.from_dict(risks[config.policy_risk]["evaluation"]).row(
        config.policy_procedure, eps_shown
    )
    summary = [
        (
            f"{data.name}: a {network.n_exits}-exit ResNet-style CNN, held-out accuracy "
            f"{accuracy[0]:.3f} at the first exit and {accuracy[-1]:.3f} at the last."
        ),
        (
            f"{config.policy_procedure} on the {config.policy_risk} risk at ε = {eps_shown:g}, "
            f"δ = {config.delta:g}, n = {config.n_cal}: mean test risk {ucb.mean_test_risk:.4f}, "
            f"population violation rate {ucb.population_violation_rate:.2f} over {trials} "
            f"splits, {100 * (ucb.relative_saving or 0):.1f}% of FLOPs saved."
        ),
        (
            f"Real inference at that policy: {timing['measured_speedup']:.2f}x faster at batch "
            f"256 and {timing_batch1['measured_speedup']:.2f}x at batch 1 (FLOPs ideal "
            f"{timing_summary['FLOPs speed-up']:.2f}x); accuracy "
            f"{timing_summary['test accuracy, early exit']:.3f} vs "
            f"{timing_summary['test accuracy, full model']:.3f} for the full model."
        ),
    ]
    vectors_table, vectors_line = pareto_side_by_side(prepared, config)
    summary.append(vectors_line)
    results: dict[str, Any] = {
        **results_header("classification", f"exitguard: certified early exit on {data.name}"),
        "summary": summary,
        "dataset": {
            "name": data.name,
            "source": data.source,
            "n_train": len(train),
            "n_heldout": len(heldout),
            "image_shape": list(data.image_shape),
            "classes": list(data.class_names),
        },
        "model": {
            "description": f"ResNet-style CNN, stage widths {list(model_config.widths)}, strides "
            f"{list(model_config.strides)}, one exit head (pool, layer norm, linear) per stage; "
            f"trained jointly with self-distillation ({settings.epochs} epochs).",
            "n_exits": network.n_exits,
            "flops_per_exit": exit_flops.tolist(),
            "full_flops": full_only,
            "accuracy_per_exit": accuracy.tolist(),
            "fingerprint": network.fingerprint,
            "from_cache": trained.from_cache,
            "train_seconds": trained.metadata.get("train_seconds"),
        },
        "settings": {
            "delta": config.delta,
            "n_cal": config.n_cal,
            "trials": trials,
            "target_risks": list(config.target_risks),
            "table_target_risks": list(TABLE_TARGET_RISKS),
            "procedures": list(config.procedures),
            "seed": config.seed,
            "confidence": network.confidence,
        },
        "risks": risks,
        "exit_histogram": {
            "risk": config.policy_risk,
            "procedure": config.policy_procedure,
            "target_risk": config.policy_target_risk,
            "threshold": policy.threshold,
            "counts": np.bincount(exits, minlength=network.n_exits).tolist(),
        },
        "timing": timing_summary,
        "policy": policy.to_dict(),
        "tables": [vectors_table],
    }
    write_report(results, Path(config.out))
    return results


def pareto_side_by_side(prepared: Prepared, config: DemoConfig) -> tuple[dict[str, Any], str]:
    """The policy's risk certified with one threshold and with per-exit thresholds."""
    from exitguard.pareto_evaluation import PerExitOutputs, side_by_side
    from exitguard.risk.exits import default_thresholds
    from exitguard.risk.losses import get_risk, per_exit_losses

    outputs, labels = prepared.outputs, prepared.heldout.labels
    risk = get_risk(config.policy_risk, rng=config.seed)
    per_exit = {risk.name: per_exit_losses(outputs.probs, labels, risk)}
    task = PerExitOutputs(
        name=prepared.data.name,
        confidences=outputs.confidences,
        per_exit=per_exit,
        loss_bounds={risk.name: risk.loss_bound},
        exit_cost=prepared.exit_flops,
        head_cost=np.array(prepared.flops.head, dtype=np.float64),
        full_cost=float(prepared.flops.full),
        grid=default_thresholds(),
    )
    return side_by_side(
        task,
        risk.name,
        config.policy_target_risk,
        n_cal=config.n_cal,
        trials=min(10, config.trials) if config.quick else config.trials,
        delta=config.delta,
        seed=config.seed,
        quick=config.quick,
    )
