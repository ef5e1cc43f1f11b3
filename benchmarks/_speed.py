"""Speed of one certified policy: FLOPs, predicted and measured speed-ups side by side.

Shared by the classification and segmentation benchmarks. For each variant of the network
(as trained; BatchNorm folded; folded and channels-last) and each batch size: the FLOPs
speed-up of the exits taken, the speed-up the latency profile predicts for them, and the
measured one (policy and full model timed interleaved in this run).

The first two variants are served batches in torch's standard (channels-first) layout; the
channels-last variant converts its input itself. The layout is set on purpose: a one-channel
batch indexed out of a numpy array has the strides of channels-last, and torch would then
run the "as trained" network channels-last too.
"""

from __future__ import annotations

from typing import Any

import torch

from exitguard.nn import count_flops, measure_speedup, optimize_for_inference, profile_latency

VARIANTS = ("plain", "folded", "folded+channels-last")


def variant(network: Any, name: str) -> Any:
    if name == "plain":
        return network
    optimised, _ = optimize_for_inference(network, channels_last=name.endswith("channels-last"))
    return optimised


def speed_rows(
    network: Any,
    images: torch.Tensor,
    policy: Any,
    *,
    batch_sizes: tuple[int, ...],
    repeats: int,
    variants: tuple[str, ...] = VARIANTS,
    batch_one_samples: int = 200,
) -> list[dict[str, Any]]:
    """One row per (variant, batch size); printed as they come."""
    flops = count_flops(network, images[:1])
    rows = []
    print(
        f"\n{'variant':<22}{'batch':>6}{'full ms/sample':>16}{'policy ms/sample':>18}"
        f"{'FLOPs':>8}{'predicted':>11}{'measured':>10}"
    )
    images = images.clone(memory_format=torch.contiguous_format)  # the standard layout
    for name in variants:
        net = variant(network, name)
        profile = profile_latency(
            net, images[: max(batch_sizes)], batch_sizes=batch_sizes, repeats=repeats + 4
        )
        for batch in batch_sizes:
            x = images if batch > 1 else images[:batch_one_samples]
            m = measure_speedup(
                net, x, policy, batch_size=batch, repeats=repeats, profile=profile, flops=flops
            )
            rows.append({"variant": name, **m.to_dict()})
            print(
                f"{name:<22}{batch:>6}{m.full_ms:>16.4f}{m.early_ms:>18.4f}"
                f"{m.flops_speedup:>7.2f}x{m.predicted_speedup:>10.2f}x"
                f"{m.measured_speedup:>9.2f}x"
            )
    return rows
