"""Image classification end to end: train (or load) a multi-exit CNN, calibrate, measure, report.

The main job of the project (``exitguard demo``): per-exit outputs are collected once on
held-out data, the paper's four risks are calibrated with naive, CRC, UCB-WSR and LTT over a
grid of target risks and checked on repeated random splits, and one calibrated policy is run
for real against the full model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from exitguard.calibration import build_table, calibrate
from exitguard.data.images import ImageDataset, load_dataset
from exitguard.nn import (
    ClassifierHead,
    EarlyExitNetwork,
    ExitOutputs,
    FlopsTable,
    collect,
    count_flops,
    optimize_for_inference,
    profile_latency,
)
from exitguard.nn.blocks import BasicBlock
from exitguard.report.plots import default_risk_title
from exitguard.report.results import DemoResults, ModelInfo, Table, summary_lines
from exitguard.risk.exits import exit_index
from exitguard.risk.losses import RISKS
from exitguard.tasks.common import (
    CachedModel,
    ImageOptions,
    ModelCache,
    PolicyOptions,
    ServesTrained,
    accuracy_measures,
    calibration_split,
    demo_settings,
    evaluate_risks,
    exit_output_files,
    image_dataset_info,
    loss_bound,
    results_header,
    table_writer,
    time_inference,  # noqa: F401  (benchmarks/classification.py imports it from here)
    time_policy,
    timed_policy,
    train_jointly,
    write_demo_report,
)

if TYPE_CHECKING:
    from exitguard.distributed.options import RaySettings

TABLE_TARGET_RISKS = (0.01, 0.02, 0.05, 0.1, 0.2)
CACHE_FORMAT = "exitguard.classifier/1"
MODELS = ModelCache("classifier", CACHE_FORMAT)  # cache entries "classifier-<dataset>-<key>"


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
            # The stem takes stage 0's stride, so no block runs at the input resolution (a
            # full-resolution block is memory-bound on CPU: its time share far exceeds its
            # FLOPs share, and the first exit would save less time than FLOPs).
            stem = nn.Sequential(
                nn.Conv2d(config.in_channels, width, 3, stride, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
            )
            block = BasicBlock(width, width, 1)
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
    lr_schedule: Literal["constant", "cosine"] = "constant"


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

    entry = MODELS.entry(
        train, model=model_config, train=settings, architecture=build().fingerprint
    )
    return entry.load_or_train(build, fit, cache_dir=cache_dir, log=log)


# ------------------------------------------------------------------------------- demo


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoConfig(ImageOptions, PolicyOptions):
    """Settings of :func:`run_demo` (the shared ones: :class:`~exitguard.tasks.common.DemoOptions`).

    ``timing_images_batch1`` test images are timed at batch 1 (all of them at batch 256).
    """

    out: str = "exitguard-report/classification"
    policy_risk: str = "prediction_gap"
    epochs: int | None = None
    timing_images_batch1: int = 200
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
        # Stride early (a strided stem: no block at 28x28), widen late: each exit's share of
        # the time follows its share of the FLOPs on CPU (benchmarks/classification.py).
        model = CNNConfig(widths=(32, 48, 64, 96, 128), strides=(2, 1, 2, 1, 1))
        # Cosine annealing: a constant rate for 6 epochs left the last exit at 0.903.
        train = TrainSettings(
            epochs=3 if quick else 10, batch_size=128, lr=2e-3, lr_schedule="cosine"
        )
    elif dataset == "mnist-5k":
        model = CNNConfig()
        train = TrainSettings(epochs=4 if quick else 10)
    else:
        # Thin early stages: on 8x8 digits a wide first stage already sees the whole image.
        model = CNNConfig(widths=(8, 12, 16, 32, 64), strides=(1, 1, 2, 1, 2))
        train = TrainSettings(epochs=4 if quick else 15)
    return model, dataclasses.replace(train, seed=seed)


@dataclasses.dataclass(frozen=True, repr=False)
class Prepared(ServesTrained):
    """A trained network with its per-exit outputs on the held-out data."""

    data: ImageDataset
    train: ImageDataset
    heldout: ImageDataset
    trained: CachedModel[EarlyExitNetwork]
    model_config: CNNConfig
    settings: TrainSettings
    outputs: ExitOutputs
    flops: FlopsTable
    served: EarlyExitNetwork | None = None


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
    served, _ = optimize_for_inference(trained.module)  # the same outputs, faster on CPU
    images = torch.from_numpy(heldout.images)
    if config.ray is None:
        outputs = collect(served, images, labels=heldout.labels, batch_size=256)
    else:  # the same batches on Ray workers: the same outputs, bit for bit
        from exitguard.distributed import collect as collect_on_ray
        from exitguard.distributed.models import classifier_payload

        payload = classifier_payload(
            trained.module, model_config, image_shape=train.image_shape, optimize=True
        )
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
    return Prepared(
        data, train, heldout, trained, model_config, settings, outputs, flops, served=served
    )


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


def run_demo(config: DemoConfig, *, log: Callable[[str], None] = print) -> DemoResults:
    """Run the classification main job and write its report; returns the results.

    Beside the report (``config.out``) it saves the loss table of every risk
    (``table_<risk>.npz``), the held-out per-exit outputs split as the timed policy used
    them (``exits_calibration.npz``, ``exits_test.npz``: ``probs`` (n, L, C), ``labels``,
    ``exit_cost``) and that policy (``policy.json``), so the README's examples run on them.
    """
    prepared = prepare(config, log=log)
    data, train, heldout = prepared.data, prepared.train, prepared.heldout
    network, trained, flops = prepared.network, prepared.trained, prepared.flops
    model_config, settings, outputs = prepared.model_config, prepared.settings, prepared.outputs
    images = torch.from_numpy(heldout.images)
    exit_flops = prepared.exit_flops
    accuracy = (outputs.probs.argmax(-1) == heldout.labels[:, None]).mean(axis=0)  # (L,)

    files: dict[str, Any] = {}

    def keep(risk: str, tables: Any) -> None:
        files[f"table_{risk}.npz"] = table_writer(
            tables, loss_bound=loss_bound(risk), risk=risk, model=network
        )

    risks = evaluate_risks(
        RISKS,
        lambda risk: risk_tables(prepared, risk, seed=config.seed),
        options=config,
        n_cal=config.n_cal,
        trials=config.trials,
        loss_bound=loss_bound,
        title=default_risk_title,
        keep=keep,
    )

    # One calibrated policy, run for real on the rest of the held-out data.
    log("running one calibrated policy for real and timing it against the full model")
    cal_idx, test_idx = calibration_split(len(heldout), config.n_cal, seed=config.seed)
    policy = calibrate(
        outputs.probs[cal_idx],
        heldout.labels[cal_idx],
        risk=config.policy_risk,
        target_risk=config.policy_target_risk,
        delta=config.delta,
        procedure=config.policy_procedure,
        exit_cost=exit_flops,
        rng=config.seed,
        seed=config.seed,  # the calibration split is a random permutation: a fixed order is valid
    ).with_model(
        n_exits=network.n_exits,
        model_fingerprint=network.fingerprint,
        confidence=network.confidence,
    )
    test_images = images[test_idx]
    # Latency profile of the served network (saved beside the policy): predicts the timings.
    log("profiling the latency of every stage and exit head at batch 1 and 256")
    profile = profile_latency(network, test_images[:256], batch_sizes=(1, 256), repeats=5)
    files["latency.json"] = lambda handle: handle.write(
        (json.dumps(profile.to_dict(), indent=2) + "\n").encode()
    )
    result = network.infer(test_images, policy)
    simulated = exit_index(outputs.confidences[test_idx], float(policy.threshold))
    exits = result.exits.numpy()
    measures, quality = accuracy_measures(
        result.predictions.numpy(),
        outputs.probs[test_idx, -1].argmax(-1),
        heldout.labels[test_idx],
        exits_match=bool(np.array_equal(exits, simulated)),
    )
    timed = timed_policy(
        policy,
        exits,
        n_exits=network.n_exits,
        flops_saving=1.0 - float(exit_flops[exits].mean()) / float(flops.full),
        n_cal=len(cal_idx),
        unit="images",
        speeds=time_policy(
            network,
            test_images,
            float(policy.threshold),
            batch_size=256,
            batch1_images=config.timing_images_batch1,
            repeats=config.timing_repeats or (3 if config.quick else 7),
            progress=config.progress,
            profile=profile,
        ),
        measures=measures,
        quality=quality,
    )
    settings_ = demo_settings(
        config,
        n_cal=config.n_cal,
        trials=config.trials,
        table_target_risks=TABLE_TARGET_RISKS,
        confidence=str(network.confidence),
    )
    summary = (
        (
            f"{data.name}: a {network.n_exits}-exit ResNet-style CNN (exits 0 to "
            f"{network.n_exits - 1}), held-out accuracy {accuracy[0]:.3f} at exit 0 and "
            f"{accuracy[-1]:.3f} at exit {network.n_exits - 1}, the full model."
        ),
        *summary_lines(risks, settings_, timed),
    )
    log("per-exit thresholds (Pareto Testing) beside the single threshold")
    vectors_table, vectors_line = pareto_side_by_side(prepared, config)
    summary = (*summary, vectors_line)
    results = DemoResults(
        task="classification",
        title=f"exitguard: certified early exit on {data.name}",
        summary=summary,
        dataset=image_dataset_info(data, n_train=len(train), n_heldout=len(heldout), unit="images"),
        model=ModelInfo(
            description=f"ResNet-style CNN, stage widths {list(model_config.widths)}, strides "
            f"{list(model_config.strides)}, one exit head (pool, layer norm, linear) per stage; "
            f"trained jointly with self-distillation ({settings.epochs} epochs).",
            n_exits=network.n_exits,
            flops_per_exit=tuple(exit_flops.tolist()),
            full_flops=float(flops.full),
            accuracy_per_exit=tuple(accuracy.tolist()),
            fingerprint=network.fingerprint,
            from_cache=trained.from_cache,
            train_seconds=trained.metadata.get("train_seconds"),
        ),
        settings=settings_,
        risks=risks,
        timed=timed,
        policy=policy.to_dict(),
        tables=(Table.from_dict(vectors_table, "tables[0]"),),
        **results_header(),
    )
    splits = {"calibration": cal_idx, "test": test_idx}
    files.update(exit_output_files(outputs.probs, heldout.labels, splits, exit_cost=exit_flops))
    write_demo_report(results, config, policy=policy, files=files, log=log)
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
