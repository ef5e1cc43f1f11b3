"""Early-exit diffusion sampling end to end: train (or load), sweep, calibrate, measure.

``run_demo(DemoConfig())`` trains a small U-ViT denoiser with DeeDiff's exits and
uncertainty modules (or loads it from the cache), places a threshold grid on pilot noise seeds,
samples N noise seeds under every threshold (the loss table), checks the calibrated policies
of naive, CRC, UCB-WSR and LTT over repeated calibration/test splits for every loss, runs one
calibrated policy for real against the full model (samples per second at batch 64), and writes
the report (:func:`exitguard.report.write_report`) with the loss tables beside it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from exitguard.data.images import ImageDataset, load_dataset
from exitguard.policy import ExitPolicy
from exitguard.report.results import (
    DemoResults,
    GridCell,
    GridRow,
    ModelInfo,
    PictureGrid,
    Speed,
    summary_lines,
)
from exitguard.tasks.common import (
    CachedModel,
    ImageOptions,
    PolicyOptions,
    calibrate_quietly,
    calibration_split,
    demo_settings,
    evaluate_risks,
    image_dataset_info,
    median_seconds,
    results_header,
    timed_policy,
    timing_bar,
    write_demo_report,
)
from exitguard.tasks.diffusion.losses import LOSSES, FeatureDistance, ssim_loss
from exitguard.tasks.diffusion.model import Denoiser, DenoiserConfig, describe
from exitguard.tasks.diffusion.sample import SampleResult, generate, to_unit
from exitguard.tasks.diffusion.sweep import (
    DiffusionSweep,
    pilot_thresholds,
    sweep,
    table_npz,
    write_table,
)
from exitguard.tasks.diffusion.train import TrainSettings, load_or_train

if TYPE_CHECKING:
    from exitguard.distributed.options import RaySettings

# Bounded image losses between samples from the same noise are small: on 8 x 8 digits even
# the most aggressive policy changes (1 - SSIM) / 2 by about 0.002 on average, while with n
# calibration samples no procedure certifies a risk below about B / n (0.002 at n = 500, 0.01
# at n = 100). Every procedure then returns the full model or lets every step leave at the
# earliest exit, and nothing in between. The 0-1 loss CHANGED (a sample whose image is not
# practically the full model's) spans its whole range over the grid, so the trade-off between
# risk and compute shows; the target risks cover both scales.
TARGET_RISKS = (
    0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
)  # fmt: skip
TABLE_TARGET_RISKS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
FIGURE_TARGET_RISKS = (0.05, 0.2, 0.5)
CHANGED = "ssim_changed"
"""The 0-1 loss derived from the SSIM loss: 1 when (1 - SSIM) / 2 exceeds ``changed_above``."""
CHANGED_ABOVE = 0.001
"""(1 - SSIM) / 2 above which a sample counts as changed (SSIM below 0.998)."""
GRID_SMALLEST_SHARE = 0.02
"""Share of pilot steps that leave early at the safest finite threshold (and stay at the most
aggressive one before 0): the grid's thresholds spread over the range where policies differ."""
LOSS_TITLES = {
    "ssim": "(1 - SSIM) / 2 against the full model's image",
    "features": "1 - cosine of classifier features against the full model's image",
}


def loss_title(name: str, *, changed_above: float = CHANGED_ABOVE) -> str:
    """A loss of the demo in words."""
    if name == CHANGED:
        return (
            f"share of samples changed: (1 - SSIM) / 2 above {changed_above:g} (SSIM below "
            f"{1 - 2 * changed_above:g}) against the full model's image"
        )
    return LOSS_TITLES[name]


def loss_scale_lines(sweep: DiffusionSweep, config: DemoConfig, *, n_cal: int) -> list[str]:
    """The summary's words on the scale of the losses against what ``n_cal`` samples certify.

    With n calibration samples no procedure certifies a risk much below B / n (B = 1): a loss
    whose most aggressive policy stays below that can only give the full model or that policy.
    """
    lines = []
    floor = 1.0 / n_cal
    for name in config.losses:  # a loop over the few losses
        most = float(sweep.table(name)[-1].mean())
        if most < floor:
            lines.append(
                f"{loss_title(name)}: even the most aggressive policy (every step at exit "
                f"{config.earliest_exit}) changes it by only {most:.4f} on average, below what "
                f"n = {n_cal} calibration samples can certify (about 1/n = {floor:.3g}); on this "
                "loss every procedure returns the full model or that policy, nothing between."
            )
    if CHANGED in sweep.losses:
        share = sweep.table(CHANGED).mean(axis=1)  # (K,)
        lines.append(
            f"The share of samples changed ((1 - SSIM) / 2 above {config.changed_above:g}) "
            f"grows from {share.min():.0%} to {share.max():.0%} over the threshold grid, so on "
            "that loss the procedures pick different policies at different ε: the trade-off "
            "between risk and compute shows there."
        )
    return lines


def with_changed(sweep: DiffusionSweep, *, changed_above: float) -> DiffusionSweep:
    """The sweep with the 0-1 loss :data:`CHANGED`: 1 where (1 - SSIM) / 2 > ``changed_above``.

    It is a function of each sample's own SSIM loss, so it is a loss table like the others
    (row 0 is 0, values in {0, 1}); it needs the ``ssim`` loss.
    """
    changed = (sweep.table("ssim") > changed_above).astype(np.float64)  # (K, N)
    return dataclasses.replace(sweep, losses={**sweep.losses, CHANGED: changed})


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoConfig(ImageOptions, PolicyOptions):
    """Settings of :func:`run_demo` (the shared ones: :class:`~exitguard.tasks.common.DemoOptions`).

    ``n_samples`` noise seeds are tabulated (default 1000, 200 with ``quick``); ``n_cal`` of
    them calibrate and the rest test, so ``n_cal`` is capped at half of ``n_samples``.
    ``model`` and ``train`` override the architecture and training settings chosen for the
    dataset (``train_iterations`` only the number of iterations).
    """

    out: str = "exitguard-report/diffusion"
    n_cal: int = 500
    n_samples: int | None = None
    target_risks: tuple[float, ...] = TARGET_RISKS
    losses: tuple[str, ...] = LOSSES
    changed_above: float = CHANGED_ABOVE
    policy_loss: str = CHANGED
    policy_target_risk: float = 0.2
    figure_target_risks: tuple[float, ...] = FIGURE_TARGET_RISKS
    earliest_exit: int = 1
    n_thresholds: int = 20
    pilot_samples: int = 64
    batch_size: int = 64
    timing_samples: int = 128
    ray: RaySettings | None = None  # sweep on Ray
    model: DenoiserConfig | None = None
    train: TrainSettings | None = None
    train_iterations: int | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.losses) - set(LOSSES))
        if unknown or not self.losses:
            raise ValueError(f"`losses` must name some of {LOSSES}; got {self.losses!r}.")
        if self.policy_loss not in self.risk_names:
            raise ValueError(
                f"`policy_loss` must be one of `losses` {self.losses} (or {CHANGED!r}, which "
                f"needs 'ssim'); got {self.policy_loss!r}."
            )
        if not 0.0 <= self.changed_above < 1.0:
            raise ValueError(f"`changed_above` must lie in [0, 1); got {self.changed_above!r}.")

    @property
    def risk_names(self) -> tuple[str, ...]:
        """The losses evaluated: ``losses``, and :data:`CHANGED` when ``ssim`` is one."""
        return (*self.losses, CHANGED) if "ssim" in self.losses else tuple(self.losses)


# ------------------------------------------------------------------------- settings


def model_settings(dataset: str, *, quick: bool, seed: int) -> tuple[DenoiserConfig, TrainSettings]:
    """The denoiser and its training for a dataset (8 x 8 digits or a 28 x 28 set).

    On 8 x 8 digits: patch 2 (16 tokens), width 64, 7 blocks, T = 100, 3000 AdamW iterations
    at batch 128 (600 with ``quick``). On 28 x 28 images: patch 4 (49 tokens), width 96,
    3000 iterations (1000 with ``quick``; about 20 minutes on two CPU cores).
    """
    if dataset == "digits":
        model = DenoiserConfig(image_size=8, patch_size=2, width=64, depth=7, n_heads=4)
        train = TrainSettings(iterations=600 if quick else 3000, batch_size=128, lr=2e-3)
    else:
        model = DenoiserConfig(image_size=28, patch_size=4, width=96, depth=7, n_heads=4)
        train = TrainSettings(iterations=1000 if quick else 3000, batch_size=128, lr=1e-3)
    return model, dataclasses.replace(train, seed=seed)


def training_images(data: ImageDataset) -> tuple[ImageDataset, torch.Tensor]:
    """The training part (all of digits; the 60000 training images of 28 x 28 sets), and its
    images scaled to [-1, 1]."""
    if data.name == "fashion-mnist":
        data = data.subset(np.arange(60000))
    return data, torch.from_numpy(data.images) * 2.0 - 1.0  # (N, C, H, W)


def feature_distance(
    dataset: str,
    *,
    path: str | None,
    seed: int,
    cache_dir: str | None,
    progress: bool,
    log: Callable[[str], None],
) -> FeatureDistance:
    """The ``features`` loss: the project's multi-exit classifier trained on the same dataset.

    The split and settings are those of ``exitguard demo`` (classification) on that dataset
    (:func:`exitguard.tasks.classification.classifier_data` and ``classifier_settings``), so
    a classifier it already cached is reused.
    """
    from exitguard.tasks.classification import classifier_data, classifier_settings
    from exitguard.tasks.classification import load_or_train as load_classifier

    _, train, _ = classifier_data(dataset, path=path, seed=seed)
    config, settings = classifier_settings(dataset, seed=seed)
    trained = load_classifier(
        train,
        model_config=config,
        settings=settings,
        cache_dir=Path(cache_dir) if cache_dir else None,
        progress=progress,
        log=log,
    )
    log("feature classifier: " + ("loaded from cache" if trained.from_cache else "trained"))
    return FeatureDistance(trained.module)


# ------------------------------------------------------------------------- pieces


@dataclasses.dataclass(frozen=True, repr=False)
class Prepared:
    """A trained denoiser, its threshold grid and its sweep."""

    data: ImageDataset
    train: ImageDataset
    trained: CachedModel[Denoiser]
    config: DenoiserConfig
    settings: TrainSettings
    thresholds: np.ndarray
    sweep: DiffusionSweep
    n_cal: int
    trials: int

    @property
    def model(self) -> Denoiser:
        return self.trained.module


def prepare(config: DemoConfig, *, log: Callable[[str], None] = print) -> Prepared:
    """Load the data, train or load the denoiser, place the grid on pilot seeds, sweep."""
    data = load_dataset(config.dataset, path=config.dataset_path)
    train, images = training_images(data)
    model_config, settings = model_settings(config.dataset, quick=config.quick, seed=config.seed)
    model_config = config.model or dataclasses.replace(
        model_config, channels=data.image_shape[0], image_size=data.image_shape[1]
    )
    settings = config.train or settings
    if config.train_iterations is not None:
        settings = dataclasses.replace(settings, iterations=config.train_iterations)
    log(f"data: {data!r}; {len(train)} training images")
    trained = load_or_train(
        images,
        dataset=data.name,
        data_fingerprint=train.fingerprint,
        config=model_config,
        settings=settings,
        cache_dir=config.cache_dir,
        progress=config.progress,
        log=log,
    )
    log("denoiser: " + ("loaded from cache" if trained.from_cache else "trained and cached"))
    n_samples = config.n_samples or (200 if config.quick else 1000)
    n_cal = min(config.n_cal, n_samples // 2)
    trials = min(config.trials, 20) if config.quick else config.trials
    count = min(config.n_thresholds, 12) if config.quick else config.n_thresholds
    log(f"placing {count} thresholds on {config.pilot_samples} pilot samples of the full model")
    thresholds = pilot_thresholds(
        trained.module,
        seed=config.seed,
        n=config.pilot_samples,
        count=count,
        earliest_exit=config.earliest_exit,
        smallest_share=GRID_SMALLEST_SHARE,
    )
    loss_fns: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}
    for name in config.losses:  # a loop over the few losses
        if name == "ssim":
            loss_fns[name] = ssim_loss
        else:
            loss_fns[name] = feature_distance(
                config.dataset,
                path=config.dataset_path,
                seed=config.seed,
                cache_dir=config.cache_dir,
                progress=config.progress,
                log=log,
            )
    batch_size = max(1, min(config.batch_size, 2048 // max(1, thresholds.size)))
    if config.ray is None:
        table = sweep(
            trained.module,
            n=n_samples,
            seed=config.seed,
            thresholds=thresholds,
            earliest_exit=config.earliest_exit,
            losses=loss_fns,
            batch_size=batch_size,
            progress=config.progress,
        )
    else:  # the same cells on Ray workers: the same table, bit for bit
        from exitguard.distributed import diffusion_sweep
        from exitguard.distributed.models import classifier_payload
        from exitguard.tasks.classification import classifier_settings

        features = None
        if "features" in loss_fns:
            classifier = classifier_settings(config.dataset, seed=config.seed)[0]
            network = loss_fns["features"].network  # type: ignore[attr-defined]
            features = classifier_payload(network, classifier, image_shape=data.image_shape)
        table = diffusion_sweep(
            trained.module,
            n=n_samples,
            seed=config.seed,
            thresholds=thresholds,
            earliest_exit=config.earliest_exit,
            losses=tuple(loss_fns),
            features=features,
            batch_size=batch_size,
            progress=config.progress,
            log=log,
            **config.ray.run_options(),
        )
    log(f"sweep: {thresholds.size} thresholds x {n_samples} samples in {table.seconds:.0f} s")
    if "ssim" in config.losses:
        table = with_changed(table, changed_above=config.changed_above)
    return Prepared(data, train, trained, model_config, settings, thresholds, table, n_cal, trials)


def calibrated(
    prepared: Prepared,
    cal: np.ndarray,
    *,
    loss: str,
    target_risk: float,
    delta: float,
    procedure: str,
) -> ExitPolicy:
    """A policy calibrated on the sweep's columns ``cal`` (the full model when none is
    certified), recording the model."""
    table = prepared.sweep
    return calibrate_quietly(
        {
            "losses": table.table(loss)[:, cal],
            "cost": table.cost[:, cal],
            "thresholds": table.thresholds,
        },
        risk=loss,
        loss_bound=1.0,
        target_risk=target_risk,
        delta=delta,
        procedure=procedure,
        confidence="uem",
        n_exits=prepared.model.n_exits,
        model_fingerprint=prepared.model.fingerprint,
    )


def time_sampling(
    model: Denoiser,
    indices: np.ndarray,
    threshold: float,
    *,
    seed: int,
    earliest_exit: int,
    batch_size: int,
    repeats: int,
    progress: bool = False,
) -> tuple[dict[str, float], SampleResult, SampleResult]:
    """Samples per second of early-exit and full-model sampling, run side by side.

    Both generate the same samples from the same noise; the median of ``repeats`` runs after
    a warm-up. Returns the timings and the two runs' results.
    """
    runs: dict[str, SampleResult] = {}

    def run(value: float, key: str) -> None:
        runs[key] = generate(
            model,
            indices,
            seed=seed,
            threshold=value,
            earliest_exit=earliest_exit,
            batch_size=batch_size,
        )

    desc = f"timing {len(indices)} samples at batch {batch_size}"
    with timing_bar(runs=2, repeats=repeats, enabled=progress, desc=desc) as tick:
        full = median_seconds(lambda: run(math.inf, "full"), repeats=repeats, tick=tick)
        early = median_seconds(lambda: run(threshold, "early"), repeats=repeats, tick=tick)
    n = len(indices)
    timing = {
        "batch_size": batch_size,
        "samples": n,
        "full_samples_per_second": n / full,
        "early_exit_samples_per_second": n / early,
        "measured_speedup": full / early,
    }
    return timing, runs["full"], runs["early"]


def _cell(image: np.ndarray, *, cmap: str, vmin: float, vmax: float) -> GridCell:
    return GridCell(
        image=np.asarray(image, dtype=np.float64).round(4), cmap=cmap, vmin=vmin, vmax=vmax
    )


def _label(policy: ExitPolicy) -> str:
    return f"{policy.procedure} at ε = {policy.target_risk:g}"


def figures(
    prepared: Prepared,
    policies: Sequence[ExitPolicy],
    shown: np.ndarray,
    *,
    heat_samples: np.ndarray,
    earliest_exit: int,
    changed_above: float = CHANGED_ABOVE,
) -> list[PictureGrid]:
    """The picture grids of the report: samples beside early-exit samples, and exit maps.

    The full model appears once: a policy that certified nothing (the full model) gets no
    column or map of its own, the captions say which; policies that picked the same
    threshold share one column.
    """
    table = prepared.sweep
    last = table.n_exits - 1
    distinct: dict[int, list[ExitPolicy]] = {}
    for policy in policies:  # a loop over the few policies shown
        if not policy.is_full_model:
            distinct.setdefault(int(policy.index), []).append(policy)
    full = [p for p in policies if p.is_full_model]
    full_note = (
        f" At {', '.join(f'ε = {p.target_risk:g}' for p in full)} nothing could be certified, "
        "so the policy is the full model (the first column)."
        if full
        else ""
    )
    labels = {index: " / ".join(_label(p) for p in group) for index, group in distinct.items()}
    rows = []
    for i in shown.tolist():  # a few example samples
        cells = [_cell(table.images[0, i, 0], cmap="gray", vmin=0.0, vmax=1.0)]
        cells += [
            _cell(table.images[index, i, 0], cmap="gray", vmin=0.0, vmax=1.0) for index in distinct
        ]
        rows.append(GridRow(label=f"seed {i}", cells=tuple(cells)))
    first = policies[0]
    samples = PictureGrid(
        file="diffusion_samples.png",
        title="Full-model samples beside early-exit samples from the same noise",
        caption=(
            f"Each row starts from the same noise (test seeds); columns: the full model, then "
            f"the {first.procedure} policy calibrated at each ε (δ = {first.delta:g}, n = "
            f"{first.n}) on the loss {loss_title(first.risk, changed_above=changed_above)}."
            f"{full_note}"
        ),
        columns=("full model", *labels.values()),
        rows=tuple(rows),
    )
    steps = table.exits.shape[-1]
    step_ticks = sorted({0, steps // 4, steps // 2, 3 * steps // 4, steps - 1})
    sample_ticks = sorted({0, heat_samples.size - 1})
    heat_rows = []
    means = []
    for index, group in distinct.items():  # a loop over the few distinct policies
        depth = table.exits[index][heat_samples].astype(np.float64)  # (S, T)
        means.append(f"{labels[index]}: {float(table.exits[index].mean()):.2f}")
        heat_rows.append(
            GridRow(
                label=" / ".join(f"ε = {p.target_risk:g}" for p in group),
                cells=(_cell(depth, cmap="viridis", vmin=0.0, vmax=float(last)),),
            )
        )
    grids = [samples]
    if heat_rows:
        grids.append(
            PictureGrid(
                file="diffusion_exits.png",
                title="Exit taken at every denoising step",
                caption=(
                    f"Rows of each map: {heat_samples.size} test samples; columns: the {steps} "
                    f"steps from t = {steps - 1} (pure noise, left) to t = 0 (right). Colour: "
                    f"the exit (0 = after the first block, {last} = the full model). No sample "
                    f"ever leaves before exit {earliest_exit}: as in DeeDiff, the sampler lets "
                    f"samples leave from exit {earliest_exit} on (`earliest_exit = "
                    f"{earliest_exit}`), so the colours start there. Mean exit over all "
                    f"samples and steps: {'; '.join(means)}.{full_note}"
                ),
                columns=(f"exit per step ({heat_samples.size} samples x {steps} steps)",),
                rows=tuple(heat_rows),
                colorbar="exit (0-based)",
                colorbar_ticks=tuple(
                    (float(e), f"{e} (full model)" if e == last else str(e))
                    for e in range(last + 1)
                ),
                xlabel="denoising step (timestep t)",
                ylabel="test sample",
                xticks=tuple((float(s), f"t={steps - 1 - s}") for s in step_ticks),
                yticks=tuple((float(r), str(r)) for r in sample_ticks),
            )
        )
    return grids


# ------------------------------------------------------------------------------- demo


def run_demo(config: DemoConfig, *, log: Callable[[str], None] = print) -> DemoResults:
    """Run the diffusion task end to end, write its report to ``config.out``, return the results.

    Beside the report it saves the sweep's loss table of every loss (``table_<loss>.npz``,
    see :func:`~exitguard.tasks.diffusion.sweep.write_table`) and the timed policy
    (``policy.json``).
    """
    started = time.perf_counter()
    prepared = prepare(config, log=log)
    model, table, data = prepared.model, prepared.sweep, prepared.data
    n_cal, trials = prepared.n_cal, prepared.trials
    n_samples = table.indices.size
    flops = table.flops

    log("calibrating every loss over repeated splits")
    risks = evaluate_risks(
        config.risk_names,
        lambda loss: {"losses": table.table(loss), "cost": table.cost, "exits": table.mean_exit},
        options=config,
        n_cal=n_cal,
        trials=trials,
        loss_bound=lambda loss: 1.0,
        title=functools.partial(loss_title, changed_above=config.changed_above),
    )
    cal, test = (np.sort(part) for part in calibration_split(n_samples, n_cal, seed=config.seed))

    def policy_at(target_risk: float) -> ExitPolicy:
        return calibrated(
            prepared,
            cal,
            loss=config.policy_loss,
            target_risk=target_risk,
            delta=config.delta,
            procedure=config.policy_procedure,
        )

    policy = policy_at(config.policy_target_risk)
    shown_policies = [policy_at(eps) for eps in config.figure_target_risks]
    threshold = math.inf if policy.threshold is None else float(policy.threshold)

    log("sampling with one calibrated policy for real and timing it against the full model")
    timed = test[: min(config.timing_samples, test.size)]
    repeats = config.timing_repeats or (1 if config.quick else 3)
    timing, full_run, early_run = time_sampling(
        model,
        timed,
        threshold,
        seed=config.seed,
        earliest_exit=config.earliest_exit,
        batch_size=config.batch_size,
        repeats=repeats,
        progress=config.progress,
    )
    timed_loss = ssim_loss(to_unit(early_run.images), to_unit(full_run.images)).numpy()
    sweep_exits = table.exits[policy.index][timed].astype(np.int64)  # (S, T)
    steps = model.config.steps
    step_flops = np.asarray(flops["to_exit"], dtype=np.float64)
    full_cost = float(flops["full"]) * steps
    early_cost = (
        full_cost
        if math.isinf(threshold)
        else float(step_flops[early_run.exits.numpy()].sum(axis=1).mean())
    )
    test_losses = table.table(config.policy_loss)[policy.index, test]
    record = timed_policy(
        policy,
        early_run.exits.numpy(),
        n_exits=model.n_exits,
        flops_saving=1.0 - early_cost / full_cost,
        n_cal=int(cal.size),
        unit="samples",
        counted="(sample, denoising step) pairs",
        speeds=[
            Speed(
                batch_size=config.batch_size,
                speedup=timing["measured_speedup"],
                baseline=timing["full_samples_per_second"],
                early=timing["early_exit_samples_per_second"],
                unit="samples per second",
            )
        ],
        measures=[
            ("denoising steps", steps),
            ("test risk (sweep, test split)", float(test_losses.mean())),
            ("test risk (timed samples, SSIM loss)", float(timed_loss.mean())),
            (
                "exits equal to the sweep's",
                float(
                    (early_run.exits.numpy() == sweep_exits).mean()
                    if not policy.is_full_model
                    else 1.0
                ),
            ),
        ],
        quality=f"SSIM loss {timed_loss.mean():.4f} against the full model's samples",
    )
    history = prepared.trained.metadata.get("history", {})
    final_losses = {key: values[-1] for key, values in history.items() if key != "iteration"}
    settings = demo_settings(
        config,
        n_cal=n_cal,
        trials=trials,
        table_target_risks=TABLE_TARGET_RISKS,
        confidence="uem",
        extra={
            "losses": {
                name: loss_title(name, changed_above=config.changed_above)
                for name in config.risk_names
            },
            "earliest_exit": config.earliest_exit,
            "thresholds": [
                "never" if math.isinf(v) else float(v) for v in table.thresholds.tolist()
            ],
            "n_samples": n_samples,
            "sweep_seconds": table.seconds,
        },
    )
    summary = (
        (
            f"{data.name}: a {model.n_exits}-exit U-ViT denoiser (DeeDiff exits and uncertainty "
            f"modules; exits 0 to {model.n_exits - 1}, samples may leave from exit "
            f"{config.earliest_exit} on), T = {steps} ancestral DDPM steps; {n_samples} "
            f"generated samples tabulated under {table.thresholds.size} thresholds."
        ),
        *summary_lines(risks, settings, record),
        *loss_scale_lines(table, config, n_cal=n_cal),
    )
    rng = np.random.default_rng(config.seed + 2)
    shown = np.sort(rng.choice(test, size=min(6, test.size), replace=False))
    heat_samples = np.sort(rng.choice(test, size=min(16, test.size), replace=False))
    results = DemoResults(
        task="diffusion",
        title=f"exitguard: certified early-exit sampling on {data.name}",
        summary=summary,
        dataset=image_dataset_info(
            data,
            n_train=len(prepared.train),
            n_heldout=n_samples,
            unit="samples",
            note="the held-out samples are generated samples (noise seeds), not dataset images",
        ),
        model=ModelInfo(
            description=describe(prepared.config)
            + f" Trained with DeeDiff's losses for {prepared.settings.iterations} iterations "
            f"(batch {prepared.settings.batch_size}, EMA {prepared.settings.ema}).",
            n_exits=model.n_exits,
            flops_per_exit=tuple(float(v) for v in flops["to_exit"]),
            full_flops=float(flops["full"]),
            flops_unit="per sample and denoising step",
            fingerprint=model.fingerprint,
            from_cache=prepared.trained.from_cache,
            train_seconds=prepared.trained.metadata.get("train_seconds"),
            extra={
                "flops": flops,
                "steps": steps,
                "parameters": sum(p.numel() for p in model.parameters()),
                "final_train_losses": final_losses,
                "config": dataclasses.asdict(prepared.config),
                "train": dataclasses.asdict(prepared.settings),
            },
        ),
        settings=settings,
        risks=risks,
        timed=record,
        policy=policy.to_dict(),
        figures=tuple(
            figures(
                prepared,
                shown_policies,
                shown,
                heat_samples=heat_samples,
                earliest_exit=config.earliest_exit,
                changed_above=config.changed_above,
            )
        ),
        extra={"seconds": time.perf_counter() - started},
        **results_header(),
    )
    files: dict[str, Any] = {
        f"table_{loss}.npz": lambda handle, loss=loss: table_npz(table, handle, loss=loss)
        for loss in config.risk_names
    }
    write_demo_report(results, config, policy=policy, files=files, log=log)
    return results


def write_demo_table(
    config: DemoConfig,
    path: str | Path,
    *,
    loss: str = "ssim",
    log: Callable[[str], None] = print,
) -> Path:
    """Train or load the demo's model, sweep, and write the loss table npz (``write_table``)."""
    return write_table(prepare(config, log=log).sweep, path, loss=loss)
