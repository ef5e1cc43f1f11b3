"""Early-exit inference with real compute skipping: speed-ups at batch 1 and batch 256.

Two models, each cut into 4 stages with an exit after each, on random 3x32x32 inputs:

- ``resnet``: a ResNet-style CNN (two 3x3 conv-BN layers with a residual per stage,
  64/128/256/512 channels, strides 1/2/2/2); its early stages are memory-bound;
- ``vit``: an isotropic ViT-like encoder (4x4 patches, 65 tokens, 8 equal blocks, exits
  after every second block), where time should track FLOPs.

For policies whose mean FLOPs are about 30%, 50% and 70% of the full model, side by side in
one run (every configuration is timed once per round, rounds repeated, medians reported):

- FLOPs speed-up: full-model FLOPs / mean FLOPs of the policy (exit heads included);
- time-ideal speed-up: the same with each stage's (and head's) measured time at that batch
  size in place of its FLOPs, weighted by the share of samples that reach it;
- measured speed-up: wall-clock of the original model / wall-clock of ``network.infer``;
- peak memory: tensor memory allocated during the call (inputs and weights excluded), MiB.

Batch 1 runs the first ``--n-single`` samples one at a time and sums their times. The
weights are random (timing does not depend on them); the thresholds are chosen on the
batch-256 inputs to hit the FLOPs targets. Timings need an idle machine: the CPU time other
processes used during each model's measurement is recorded, with a warning when it is high.

    python benchmarks/inference.py [--threads 2] [--repeats 11] [--out results/inference.json]
    python benchmarks/inference.py --quick      # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from exitguard.nn import EarlyExitNetwork, attach_exits, count_flops
from exitguard.risk.exits import exit_indices

TARGETS = (0.3, 0.5, 0.7)


# ----------------------------------------------------------------------------- models


class ConvBlock(nn.Module):
    """conv-BN-ReLU, conv-BN, residual, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # (B, cout, H', W')
        return F.relu(x + self.bn2(self.conv2(x)))


class ResNetStyle(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.layer1 = ConvBlock(3, 64, 1)
        self.layer2 = ConvBlock(64, 128, 2)
        self.layer3 = ConvBlock(128, 256, 2)
        self.layer4 = ConvBlock(256, 512, 2)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 512, 4, 4)
        return self.fc(x.mean(dim=(2, 3)))  # (B, num_classes)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: attention and a 4x MLP, each with a residual."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(self.norm1(x)).view(batch, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, heads, T, D/heads)
        attended = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, D/heads)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, tokens, dim))
        return x + self.mlp(self.norm2(x))  # (B, T, D)


class ViTStyle(nn.Module):
    def __init__(self, dim: int = 192, depth: int = 8, heads: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 65, dim) * 0.02)
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, 64, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.blocks(x)  # (B, 65, D)
        return self.head(self.norm(x)[:, 0])  # (B, classes)


def build(name: str) -> tuple[nn.Module, EarlyExitNetwork]:
    torch.manual_seed(0)
    if name == "resnet":
        model = ResNetStyle().eval()
        network = attach_exits(model, at=["layer1", "layer2", "layer3"], input_shape=(3, 32, 32))
    else:
        model = ViTStyle().eval()
        network = attach_exits(
            model,
            at=["blocks.1", "blocks.3", "blocks.5"],
            input_shape=(3, 32, 32),
            head_options={"pool": "cls"},
        )
    # Untrained exit heads give almost uniform probabilities; larger weights, growing with
    # depth as trained exits grow more confident, spread the confidences over samples.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for scale, head in enumerate(network.heads[:-1], start=1):
            weight = head.fc.weight
            std = scale / math.sqrt(weight.shape[1])
            weight.copy_(torch.randn(weight.shape, generator=generator) * std)
    return model, network.eval()


# ----------------------------------------------------------------------------- measuring


def images(n: int, *, seed: int) -> Tensor:
    """Random 3x32x32 images with per-image structure (smooth 4x4 patterns plus noise).

    Plain white noise would give every image almost the same pooled features, hence the
    same confidences and the same exit; the smooth part makes images, and exits, differ.
    """
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn((n, 3, 4, 4), generator=generator)
    smooth = F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    return smooth + 0.5 * torch.randn((n, 3, 32, 32), generator=generator)


def choose_thresholds(conf: np.ndarray, to_exit: np.ndarray, full: float) -> list[float]:
    """For each target FLOPs fraction, the threshold whose mean FLOPs come closest."""
    candidates = np.unique(np.quantile(conf[:, :-1], np.linspace(0, 1, 801)))[::-1]
    grid = np.concatenate([[math.inf], candidates])
    exits = exit_indices(conf, grid)  # (K, n)
    fractions = to_exit[exits].mean(axis=1) / full  # (K,)
    return [float(grid[np.argmin(np.abs(fractions - target))]) for target in TARGETS]


class PeakMemory(TorchDispatchMode):
    """Tracks the bytes of tensor storage that operators allocate, and their peak.

    Every storage an operator returns is counted once, until it is freed; the input and the
    weights, allocated before, are not counted. Scratch space inside kernels is not seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, Tensor):
                continue
            storage = tensor.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes and key not in self.seen:
                self.seen.add(key)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, key, nbytes)
        return out


def peak_mib(fn: Callable[[], Any]) -> float:
    """Peak tensor memory allocated while ``fn()`` runs, in MiB."""
    with PeakMemory() as tracker:
        fn()
    return tracker.peak / 2**20


def timed_rounds(configs: dict[str, Callable[[], Any]], *, repeats: int, warmup: int) -> dict:
    """Median seconds of each configuration.

    Every round runs every configuration once, in a new random order, so that slow drifts
    of the machine and the position in the round affect all of them alike.
    """
    samples: dict[str, list[float]] = {name: [] for name in configs}
    order = np.random.default_rng(0)
    for round_ in range(warmup + repeats):
        for name in order.permutation(list(configs)):
            start = time.perf_counter()
            configs[name]()
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                samples[name].append(elapsed)
    return {name: statistics.median(values) for name, values in samples.items()}


def run_batch(
    model: nn.Module,
    network: EarlyExitNetwork,
    x: Tensor,
    thresholds: list[float],
    to_exit: np.ndarray,
    full: int,
    *,
    single: bool,
    repeats: int,
    warmup: int,
) -> dict[str, Any]:
    """All measurements for one model at one batch size (batch 1 when ``single``)."""
    n = x.shape[0]
    batches = [x[i : i + 1] for i in range(n)] if single else [x]
    n_exits = network.n_exits

    def each(fn: Callable[[Tensor], Any]) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                for batch in batches:
                    fn(batch)

        return run

    # Cached inputs of every stage and head, for the per-stage times.
    with torch.inference_mode():
        stage_inputs, head_inputs = [], []
        for batch in batches:
            h, ins, outs = batch, [], []
            for stage in network.stages:
                ins.append(h)
                h = stage(h)
                outs.append(h)
            stage_inputs.append(ins)
            head_inputs.append(outs)

    configs: dict[str, Callable[[], Any]] = {
        "backbone": each(model),
        "never": each(lambda b: network.infer(b, math.inf)),
    }
    for target, threshold in zip(TARGETS, thresholds, strict=True):
        configs[f"policy{target}"] = each(lambda b, t=threshold: network.infer(b, t))
    for index in range(n_exits):

        def stage_run(index: int = index) -> None:
            with torch.inference_mode():
                for ins in stage_inputs:
                    network.stages[index](ins[index])

        def head_run(index: int = index) -> None:
            with torch.inference_mode():
                for outs in head_inputs:
                    network.heads[index](outs[index])

        configs[f"stage{index}"] = stage_run
        configs[f"head{index}"] = head_run
    times = timed_rounds(configs, repeats=repeats, warmup=warmup)

    stage_t = np.array([times[f"stage{i}"] for i in range(n_exits)])
    head_t = np.array([times[f"head{i}"] for i in range(n_exits)])
    full_ideal = stage_t.sum() + head_t[-1]
    backbone_t = times["backbone"]
    row: dict[str, Any] = {
        "batch": 1 if single else n,
        "samples": n,
        "backbone_ms": 1e3 * backbone_t,
        "never_exit_ms": 1e3 * times["never"],
        "stage_ms": (1e3 * stage_t).tolist(),
        "head_ms": (1e3 * head_t).tolist(),
        "stage_time_shares": (stage_t / stage_t.sum()).tolist(),
        "policies": [],
    }
    row["backbone_peak_mib"] = peak_mib(configs["backbone"])
    with torch.inference_mode():
        _, conf = network.exit_confidences(x)
    for target, threshold in zip(TARGETS, thresholds, strict=True):
        exits = exit_indices(conf.numpy(), [threshold])[-1]  # (n,)
        counts = np.bincount(exits, minlength=n_exits)
        reach = counts[::-1].cumsum()[::-1] / n  # (L,) share of samples that run each stage
        ideal = (reach * (stage_t + head_t)).sum()
        flops = to_exit[exits].mean()
        measured_t = times[f"policy{target}"]
        row["policies"].append(
            {
                "target": target,
                "threshold": threshold,
                "flops_fraction": flops / full,
                "exit_shares": (counts / n).tolist(),
                "flops_speedup": full / flops,
                "time_ideal_speedup": full_ideal / ideal,
                "measured_speedup": backbone_t / measured_t,
                "measured_ms": 1e3 * measured_t,
                "peak_mib": peak_mib(configs[f"policy{target}"]),
            }
        )
    return row


class Contention:
    """CPU time that other processes used while a measurement ran (Linux ``/proc/stat``).

    Timings are only trustworthy on an otherwise idle machine: with more busy threads than
    cores, every parallel region of the kernels waits for preempted threads.
    """

    def __enter__(self) -> Contention:
        self._start = (self._machine_busy(), time.process_time(), time.perf_counter())
        self.cores = math.nan
        return self

    def __exit__(self, *exc: object) -> None:
        busy, own, wall = self._start
        if not math.isnan(busy):
            others = self._machine_busy() - busy - (time.process_time() - own)
            self.cores = max(others, 0.0) / (time.perf_counter() - wall)

    @staticmethod
    def _machine_busy() -> float:
        try:
            with open("/proc/stat", encoding="ascii") as handle:
                fields = [int(v) for v in handle.readline().split()[1:]]
        except (OSError, ValueError):
            return math.nan
        return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- report


def print_table(report: dict[str, Any]) -> None:
    machine, settings = report["machine"], report["settings"]
    print(
        f"torch {machine['torch']}, {machine['threads']} thread(s), median of "
        f"{settings['repeats']} interleaved rounds after {settings['warmup']} warm-up; batch 1 "
        f"= {settings['n_single']} samples one at a time"
    )
    header = (
        f"{'model':7} {'batch':>5} {'target':>6} {'FLOPs':>6} {'exit shares':>23} "
        f"{'FLOPs x':>7} {'ideal x':>7} {'meas x':>7} {'meas/ideal':>10} {'meas/FLOPs':>10} "
        f"{'peak MiB':>14}"
    )
    print(header)
    print("-" * len(header))
    for name, result in report["models"].items():
        for row in result["batches"]:
            for p in row["policies"]:
                shares = "/".join(f"{s:.2f}" for s in p["exit_shares"])
                peak = f"{p['peak_mib']:.1f}/{row['backbone_peak_mib']:.1f}"
                print(
                    f"{name:7} {row['batch']:>5} {p['target']:>6.0%} "
                    f"{p['flops_fraction']:>6.1%} {shares:>23} {p['flops_speedup']:>7.2f} "
                    f"{p['time_ideal_speedup']:>7.2f} {p['measured_speedup']:>7.2f} "
                    f"{p['measured_speedup'] / p['time_ideal_speedup']:>10.2f} "
                    f"{p['measured_speedup'] / p['flops_speedup']:>10.2f} {peak:>14}"
                )
            stage = "/".join(f"{s:.2f}" for s in row["stage_time_shares"])
            flops = "/".join(f"{s:.2f}" for s in result["flops_shares"])
            print(
                f"{name:7} {row['batch']:>5} backbone {row['backbone_ms']:.1f} ms, never-exit "
                f"infer {row['never_exit_ms']:.1f} ms; stage time shares {stage} "
                f"(FLOPs shares {flops})"
            )
        if (result["other_processes_cores"] or 0.0) > 0.1:
            print(
                f"WARNING: other processes kept {result['other_processes_cores']:.2f} cores busy "
                f"while {name} was measured; rerun on an idle machine (or with --threads 1)."
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--models", nargs="+", default=["resnet", "vit"])
    parser.add_argument("--batch", type=int, default=256, help="the large batch size")
    parser.add_argument("--n-single", type=int, default=64, help="samples run at batch 1")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a fast smoke run")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "inference.json"))
    args = parser.parse_args()
    if args.quick:
        args.batch, args.n_single, args.repeats, args.warmup = 32, 4, 1, 1
    torch.set_num_threads(args.threads)

    report: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "processor": platform.machine(),
            "threads": args.threads,
        },
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "models": {},
    }
    for name in args.models:
        model, network = build(name)
        table = count_flops(network)
        to_exit, full = table.to_exit, table.full
        x = images(args.batch, seed=2)
        with torch.inference_mode():
            _, conf = network.exit_confidences(x)
        thresholds = choose_thresholds(conf.numpy(), to_exit, full)
        stage = np.asarray(table.stage, dtype=np.float64)
        with Contention() as contention:
            rows = [
                run_batch(model, network, x[: args.n_single], thresholds, to_exit, full,
                          single=True, repeats=args.repeats, warmup=args.warmup),
                run_batch(model, network, x, thresholds, to_exit, full,
                          single=False, repeats=args.repeats, warmup=args.warmup),
            ]  # fmt: skip
        report["models"][name] = {
            "flops": table.to_dict(),
            "flops_shares": (stage / stage.sum()).tolist(),
            "other_processes_cores": None if math.isnan(contention.cores) else contention.cores,
            "batches": rows,
        }
    print_table(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
