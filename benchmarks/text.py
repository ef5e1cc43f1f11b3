"""Sentences per second of certified early exit on MiniLM against the plain transformers forward.

MiniLM (all-MiniLM-L6-v2, 6 layers) with an exit after every layer classifies King James
verses by genre. On held-out chapters, policies are calibrated with UCB-WSR (delta = 0.1) for
the prediction-gap and prediction-consistency risks at several target risks on ``n_cal``
verses; on the other verses, each policy's test risk, mean exit and FLOPs speed-up are
measured, and its sentences per second are timed against the plain ``transformers`` forward
(``BertModel(input_ids, attention_mask)`` and the same last head) at batch 1 and 64, side by
side in this run (all runs take turns; median of ``--repeats``). Tokenisation is done
beforehand and not timed. At batch 64 the batches are timed in the data's order and sorted by
length (less padding, for every run alike).

The ceiling: the same timing when every sentence leaves at exit ``k`` (thresholds cannot force
that, so the network's stages are run to exit ``k`` directly), and the FLOPs speed-up of an
oracle that exits at the earliest exit whose loss is not above the full model's.

    flock /tmp/exitguard-cpu.lock python benchmarks/text.py --training joint
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import exitguard
from exitguard.tasks.common import machine_info
from exitguard.tasks.text.collect import interleaved_seconds, text_tables, time_text
from exitguard.tasks.text.demo import DemoConfig, calibrated, prepare
from exitguard.tasks.text.model import length_batches, token_lengths
from exitguard.tasks.text.train import accuracy_per_exit

sys.path.insert(0, str(Path(__file__).parent))
from _cli import certification_options, results_path

RISKS = ("prediction_gap", "prediction_consistency")


def exit_ceiling(network: Any, tokens: torch.Tensor, *, batch_size: int, repeats: int) -> dict:
    """Sentences per second when every sentence leaves at exit k (k = 1..L), with its head."""
    batches = [
        tokens[torch.from_numpy(index)]
        for index in length_batches(token_lengths(tokens), batch_size=batch_size)
    ]

    def to_exit(k: int) -> Any:
        @torch.inference_mode()
        def run() -> None:
            for batch in batches:
                h = batch
                for stage in network.stages[: k + 1]:
                    h = stage(h)
                network.heads[k](h)

        return run

    runs = {f"exit {k + 1}": to_exit(k) for k in range(network.n_exits)}
    seconds = interleaved_seconds(runs, repeats=repeats)
    return {name: len(tokens) / value for name, value in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--training", choices=("heads", "joint"), default="joint")
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--n-heldout", type=int, default=3000)
    parser.add_argument("--confidence", default="max_softmax")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--sentences", type=int, default=512, help="timed at the batch size")
    parser.add_argument("--sentences-batch1", type=int, default=128, help="timed at batch 1")
    certification_options(parser, n_cal=1000, target_risk=[0.02, 0.05, 0.1], repeats=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = DemoConfig(
        training=args.training,
        n_train=args.n_train,
        n_heldout=args.n_heldout,
        confidence=args.confidence,
        seed=args.seed,
        progress=False,
    )
    start = time.perf_counter()
    prepared = prepare(config, log=lambda line: print(line, flush=True))
    print(f"prepared in {time.perf_counter() - start:.0f} s")
    network, outputs = prepared.network, prepared.outputs
    labels = outputs.labels
    accuracy = accuracy_per_exit(outputs.probs, labels)
    n = len(labels)
    order = np.random.default_rng(args.seed + 1).permutation(n)
    cal, test = order[: args.n_cal], order[args.n_cal :]
    print(
        f"{network.n_exits} exits, {args.training} training; accuracy per exit "
        f"{np.round(accuracy, 3).tolist()}; calibration {len(cal)}, test {len(test)} verses"
    )

    rows, thresholds = [], {}
    for risk in RISKS:
        tables = text_tables(outputs, risk=risk, confidence=args.confidence, seed=args.seed)
        evaluation = exitguard.evaluate(
            tables["losses"],
            procedures=("ucb-wsr",),
            target_risks=tuple(args.target_risk),
            delta=args.delta,
            n_cal=args.n_cal,
            trials=args.trials,
            cost=tables["cost"],
            seed=args.seed,
        )
        for eps in args.target_risk:
            policy = calibrated(
                prepared,
                cal,
                risk=risk,
                target_risk=eps,
                delta=args.delta,
                procedure="ucb-wsr",
                confidence=args.confidence,
                seed=args.seed,
            )
            k = policy.index
            exits = tables["exits"][k, test]
            name = f"{risk} eps={eps:g}"
            thresholds[name] = math.inf if policy.is_full_model else float(policy.threshold)
            split = evaluation.row("ucb-wsr", eps)
            rows.append(
                {
                    "risk": risk,
                    "target_risk": eps,
                    "threshold": thresholds[name],
                    "certified": policy.certified,
                    "test_risk": float(tables["losses"][k, test].mean()),
                    "mean_exit": float(exits.mean()),  # 0-based
                    "exit_counts": np.bincount(exits, minlength=network.n_exits).tolist(),
                    "flops_speedup": float(
                        outputs.flops_full[test].sum() / tables["cost"][k, test].sum()
                    ),
                    "splits_mean_test_risk": split.mean_test_risk,
                    "splits_violation_rate": split.violation_rate,
                    "splits_population_violation_rate": split.population_violation_rate,
                    "splits_flops_saving": split.relative_saving,
                }
            )
    thresholds["no early exit"] = math.inf

    tokens = prepared.tokens[torch.from_numpy(test)]
    encoder = prepared.trained.encoder
    timings = {}
    for label, batch, count, by_length in (
        (f"batch {args.batch_size}", args.batch_size, args.sentences, False),
        (f"batch {args.batch_size}, sorted by length", args.batch_size, args.sentences, True),
        ("batch 1", 1, args.sentences_batch1, False),
    ):
        start = time.perf_counter()
        timings[label] = time_text(
            network,
            encoder,
            tokens[:count],
            thresholds,
            batch_size=batch,
            repeats=args.repeats,
            sort_by_length=by_length,
        )
        print(f"timed {label} in {time.perf_counter() - start:.0f} s", flush=True)
    ceiling = {
        f"batch {args.batch_size}": exit_ceiling(
            network, tokens[: args.sentences], batch_size=args.batch_size, repeats=args.repeats
        ),
        "batch 1": exit_ceiling(
            network, tokens[: args.sentences_batch1], batch_size=1, repeats=args.repeats
        ),
    }
    for scale, speeds in ceiling.items():
        base = timings[scale]["transformers"]
        speeds.update({f"{name} speed-up": value / base for name, value in list(speeds.items())})

    gap_losses = outputs.probs.argmax(-1) != labels[:, None]  # (n, L) errors per exit
    gap = gap_losses.astype(float) - gap_losses[:, -1:].astype(float)
    consistency = (outputs.probs.argmax(-1) != outputs.probs[:, -1:].argmax(-1)).astype(float)
    oracle = {}
    for risk, per_exit in (("prediction_gap", gap), ("prediction_consistency", consistency)):
        earliest = np.argmax(per_exit[test] <= 0, axis=1)  # the last exit always qualifies
        cost = outputs.flops_to_exit[test][np.arange(len(test)), earliest]
        oracle[risk] = {
            "flops_speedup": float(outputs.flops_full[test].sum() / cost.sum()),
            "mean_exit": float(earliest.mean()),  # 0-based
        }

    b = args.batch_size
    header = (
        f"{'risk':<24}{'eps':>6}{'test risk':>10}{'mean exit':>10}{'FLOPs x':>8}"
        f"{f'b{b}':>7}{f'b{b} sort':>9}{'b1':>7}"
    )
    print()
    print(header)
    print("-" * len(header))
    for row in rows:
        name = f"{row['risk']} eps={row['target_risk']:g}"
        print(
            f"{row['risk']:<24}{row['target_risk']:>6g}{row['test_risk']:>10.4f}"
            f"{row['mean_exit']:>10.2f}{row['flops_speedup']:>7.2f}x"
            f"{timings[f'batch {b}'][f'{name} speed-up']:>6.2f}x"
            f"{timings[f'batch {b}, sorted by length'][f'{name} speed-up']:>8.2f}x"
            f"{timings['batch 1'][f'{name} speed-up']:>6.2f}x"
        )
    print(
        f"{'no early exit':<24}{'':>6}{'':>10}{network.n_exits:>10.2f}{1.0:>7.2f}x"
        f"{timings[f'batch {b}']['no early exit speed-up']:>6.2f}x"
        f"{timings[f'batch {b}, sorted by length']['no early exit speed-up']:>8.2f}x"
        f"{timings['batch 1']['no early exit speed-up']:>6.2f}x"
    )
    for label, timing in timings.items():
        print(f"transformers forward, {label}: {timing['transformers']:.1f} sentences/s")
    for scale, speeds in ceiling.items():
        shown = ", ".join(
            f"{k + 1}: {speeds[f'exit {k + 1} speed-up']:.2f}x" for k in range(network.n_exits)
        )
        print(f"everyone leaves at exit k, {scale}: {shown}")
    for risk, value in oracle.items():
        print(f"oracle ({risk}): FLOPs {value['flops_speedup']:.2f}x, mean exit "
              f"{value['mean_exit']:.2f}")  # fmt: skip

    out = results_path(args.out, "text")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "command": "python benchmarks/text.py "
        + " ".join(
            f"--{k.replace('_', '-')} " + (" ".join(map(str, v)) if isinstance(v, list) else str(v))
            for k, v in vars(args).items()
            if v is not None
        ),
        "dataset": prepared.data.describe(),
        "n_train": len(prepared.train),
        "n_heldout": n,
        "n_cal": len(cal),
        "n_test": len(test),
        "training": args.training,
        "confidence": args.confidence,
        "delta": args.delta,
        "accuracy_per_exit": accuracy.tolist(),
        "flops_per_exit": outputs.flops_to_exit[test].mean(axis=0).tolist(),
        "flops_full": float(outputs.flops_full[test].mean()),
        "mean_tokens": float(outputs.lengths[test].mean()),
        "machine": machine_info(),
        "policies": rows,
        "timing": timings,
        "ceiling_everyone_at_exit": ceiling,
        "oracle": oracle,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
