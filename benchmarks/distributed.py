"""Scaling of distributed sweeps and collection on local Ray workers, side by side in one run.

The diffusion sweep of the demo's denoiser (digits, the quick model from the cache; a pilot
grid of K thresholds; every noise seed under every threshold) runs three ways: in this
process without Ray, on 1 Ray worker and on 2 Ray workers; then every exit's outputs of the
Fashion-MNIST-sized classifier (untrained weights: the cost of a collection does not depend on
them) are collected the same three ways on synthetic 28 x 28 images. Every run uses ONE torch
thread (the process without Ray and each worker alike), so 2 workers use 2 cores. Printed and
written: wall time with and without the workers' start-up, the speed-up of 2 workers over 1,
the overhead per work item (worker time not spent computing: dispatch, transfers, shard
writing, idle), whether each result equals the single-process one bit for bit, and the cost
per sample, from which the README estimates a 50,000-sample collection on a cluster.

Run it on a quiet machine (a timing benchmark):

    flock /tmp/exitguard-cpu.lock .venv/bin/python benchmarks/distributed.py
    .venv/bin/python benchmarks/distributed.py --tiny --out /tmp/distributed.json   # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exitguard.distributed import CollectJob, DiffusionSweepJob, ShardStore, run
from exitguard.distributed.models import classifier_payload
from exitguard.nn import collect
from exitguard.tasks.classification import CNNConfig, build_classifier
from exitguard.tasks.common import machine_info
from exitguard.tasks.diffusion.demo import model_settings, training_images
from exitguard.tasks.diffusion.model import DenoiserConfig
from exitguard.tasks.diffusion.sweep import pilot_thresholds, sweep
from exitguard.tasks.diffusion.train import TrainSettings, load_or_train

ESTIMATE_N = 50_000


def same_sweep(a: Any, b: Any) -> bool:
    fields = ("exits", "images", "cost", "thresholds")
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in fields) and all(
        np.array_equal(a.losses[k], b.losses[k]) for k in b.losses
    )


def same_outputs(a: Any, b: Any) -> bool:
    fields = ("logits", "probs", "confidences")
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in fields)


def timed_runs(
    job: Any, reference: Any, *, workers: tuple[int, ...], same: Any, n: int
) -> dict[str, Any]:
    """``job`` on each worker count (fresh shard folders), with its report and checks."""
    out: dict[str, Any] = {}
    for count in workers:  # a loop over the few worker counts
        with tempfile.TemporaryDirectory(prefix="exitguard-bench-") as folder:
            start = time.perf_counter()
            report = run(job, workers=count, threads=1, shards=folder, log=lambda _: None)
            result = job.merge(ShardStore(folder), seconds=report.seconds)
            wall = time.perf_counter() - start
        busy = sum(report.compute_seconds.values())
        out[str(count)] = {
            "wall_seconds": wall,
            "startup_seconds": report.startup_seconds,
            "seconds_after_startup": wall - report.startup_seconds,
            "compute_seconds": busy,
            "items": len(report.computed),
            "overhead_per_item_seconds": report.overhead_per_item,
            "compute_seconds_per_item": busy / len(report.computed),
            "compute_seconds_per_sample": busy / n,
            "bitwise_equal_to_single_process": bool(same(result, reference)),
        }
    return out


def estimate(runs: dict[str, Any], *, single: float, n: int, per_item: int) -> dict[str, Any]:
    """Cluster time of ``ESTIMATE_N`` samples on W one-thread workers, from the measured
    per-sample cost (1-worker run), overhead per item and start-up (2-worker run)."""
    cost = runs["1"]["compute_seconds_per_sample"]
    overhead = max(0.0, runs["2"]["overhead_per_item_seconds"])
    startup = runs["2"]["startup_seconds"]
    items = math.ceil(ESTIMATE_N / per_item)
    return {
        "samples": ESTIMATE_N,
        "seconds_per_sample_per_worker": cost,
        "single_process_seconds": single / n * ESTIMATE_N,
        "workers": {
            str(w): startup + (ESTIMATE_N * cost + items * overhead) / w for w in (1, 16, 64, 256)
        },
        "assumes": "one-thread workers like this machine's cores; start-up as measured "
        "with 2 workers; items spread evenly",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-samples", type=int, default=384, help="noise seeds of the sweep")
    parser.add_argument("--n-thresholds", type=int, default=20, help="size of the grid")
    parser.add_argument("--batch-size", type=int, default=32, help="noise seeds per cell")
    parser.add_argument("--n-collect", type=int, default=20_000, help="images to collect")
    parser.add_argument("--block-size", type=int, default=1024, help="images per work item")
    parser.add_argument("--collect-batch", type=int, default=256, help="images per batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a tiny model and table (smoke run)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import ray

    from exitguard.data.images import load_dataset

    data = load_dataset("digits")
    train, images = training_images(data)
    model_config, settings = model_settings("digits", quick=True, seed=args.seed)
    if args.tiny:
        model_config = DenoiserConfig(width=32, depth=5, n_heads=2, steps=12, reference_steps=120)
        settings = TrainSettings(iterations=40, batch_size=32, warmup=5, seed=args.seed)
        args.n_samples, args.n_thresholds, args.batch_size = 24, 6, 8
        args.n_collect, args.block_size, args.collect_batch = 512, 128, 64
    trained = load_or_train(
        images,
        dataset=data.name,
        data_fingerprint=train.fingerprint,
        config=model_config,
        settings=settings,
        progress=False,
        log=print,
    )
    model = trained.module
    grid = pilot_thresholds(model, seed=args.seed, n=64, count=args.n_thresholds)
    sweep_args = dict(n=args.n_samples, seed=args.seed, thresholds=grid, batch_size=args.batch_size)

    start = time.perf_counter()
    reference = sweep(model, **sweep_args)  # type: ignore[arg-type]
    sweep_single = time.perf_counter() - start

    classifier_config = CNNConfig(widths=(24, 32, 48, 64, 96), strides=(1, 2, 1, 2, 1))
    torch.manual_seed(args.seed)
    classifier = build_classifier(classifier_config, image_shape=(1, 28, 28)).eval()
    pictures = np.random.default_rng(args.seed).random((args.n_collect, 1, 28, 28), np.float32)
    start = time.perf_counter()
    outputs = collect(classifier, torch.from_numpy(pictures), batch_size=args.collect_batch)
    collect_single = time.perf_counter() - start

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        job = DiffusionSweepJob(model, **sweep_args)  # type: ignore[arg-type]
        sweep_runs = timed_runs(job, reference, workers=(1, 2), same=same_sweep, n=args.n_samples)
        payload = classifier_payload(classifier, classifier_config, image_shape=(1, 28, 28))
        collect_job = CollectJob(
            payload, pictures, batch_size=args.collect_batch, block_size=args.block_size
        )
        collect_runs = timed_runs(
            collect_job, outputs, workers=(1, 2), same=same_outputs, n=args.n_collect
        )
    finally:
        ray.shutdown()

    results: dict[str, Any] = {"machine": {**machine_info(), "threads_per_worker": 1}}
    print(
        f"{'run':<22}{'no Ray':>9}{'1 worker':>10}{'2 workers':>11}{'speed-up':>10}"
        f"{'w/o start':>10}{'start-up':>10}{'items':>7}{'overhead/item':>15}{'bitwise':>9}"
    )
    for name, single, runs, n, per_item in (
        ("diffusion sweep", sweep_single, sweep_runs, args.n_samples, args.batch_size),
        ("collection", collect_single, collect_runs, args.n_collect, args.block_size),
    ):
        one, two = runs["1"], runs["2"]
        bitwise = one["bitwise_equal_to_single_process"] and two["bitwise_equal_to_single_process"]
        speedup = one["wall_seconds"] / two["wall_seconds"]
        speedup_running = one["seconds_after_startup"] / two["seconds_after_startup"]
        print(
            f"{name:<22}{single:>8.1f}s{one['wall_seconds']:>9.1f}s{two['wall_seconds']:>10.1f}s"
            f"{speedup:>9.2f}x{speedup_running:>9.2f}x{two['startup_seconds']:>9.1f}s"
            f"{two['items']:>7}{1000 * two['overhead_per_item_seconds']:>12.1f} ms"
            f"{bitwise!s:>9}"
        )
        results[name.replace(" ", "_")] = {
            "samples": n,
            "samples_per_item": per_item,
            "single_process_seconds": single,
            "runs": runs,
            "speedup_2_over_1": speedup,
            "speedup_2_over_1_after_startup": speedup_running,
            "estimate": estimate(runs, single=single, n=n, per_item=per_item),
        }
    results["diffusion_sweep"]["settings"] = {
        "model": dataclasses.asdict(model_config),
        "thresholds": int(grid.size),
        "batch_size": args.batch_size,
        "thresholds_per_batch": "all",
        "losses": ["ssim"],
    }
    results["collection"]["settings"] = {
        "model": dataclasses.asdict(classifier_config),
        "image_shape": [1, 28, 28],
        "batch_size": args.collect_batch,
    }
    for name in ("diffusion_sweep", "collection"):  # the README's estimate
        guess = results[name]["estimate"]
        print(
            f"{name}: {1000 * guess['seconds_per_sample_per_worker']:.2f} ms per sample per "
            f"worker; {ESTIMATE_N} samples: one process {guess['single_process_seconds']:.0f} s, "
            + ", ".join(f"{w} workers {s:.0f} s" for w, s in guess["workers"].items())
        )
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / "distributed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
