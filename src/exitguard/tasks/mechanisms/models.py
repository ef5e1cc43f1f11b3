"""The demo's models: cascade members, the skip network, and the classifier as one model.

Branch exits, learned halting and anytime prediction all use the classification demo's
multi-exit CNN (:func:`exitguard.tasks.classification.build_classifier`); the cascade ends in
that same CNN (:class:`FullModel`), so these four mechanisms share one reference model and
their risks are comparable. Layer skipping needs blocks that keep their shape, so it has its
own residual network (:func:`build_skip_network`), of a similar cost.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from torch import Tensor, nn

from exitguard.nn import ClassifierHead, EarlyExitNetwork
from exitguard.nn.blocks import BasicBlock
from exitguard.nn.skipping import SkipGate, SkipNetwork


class FullModel(nn.Module):
    """An early-exit network run as one model: every stage, then the last exit's head."""

    def __init__(self, network: EarlyExitNetwork) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for index in range(self.network.n_exits):
            h = self.network._run_stage(index, h)
        return self.network.heads[-1](h)  # (B, C)


def _stem(in_channels: int, width: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
    )


@dataclasses.dataclass(frozen=True)
class SmallCNNConfig:
    """A single-exit CNN for a cascade: a stem, one block per width, a classifier head."""

    widths: tuple[int, ...] = (8,)
    strides: tuple[int, ...] = (1,)
    in_channels: int = 1
    num_classes: int = 10

    def __post_init__(self) -> None:
        if not self.widths or len(self.widths) != len(self.strides):
            raise ValueError(
                "`widths` and `strides` must have the same length, at least one block; got "
                f"{len(self.widths)} and {len(self.strides)}."
            )


def build_small_cnn(config: SmallCNNConfig) -> nn.Module:
    """(B, C_in, H, W) -> logits (B, num_classes)."""
    layers: list[nn.Module] = [_stem(config.in_channels, config.widths[0])]
    channels = config.widths[0]
    for width, stride in zip(config.widths, config.strides, strict=True):
        layers.append(BasicBlock(channels, width, stride))
        channels = width
    layers.append(ClassifierHead(channels, config.num_classes))
    return nn.Sequential(*layers)


@dataclasses.dataclass(frozen=True)
class SkipConfig:
    """A residual network for layer skipping.

    Stage ``s`` has width ``widths[s]`` and ``blocks[s]`` gated blocks that keep the shape;
    between stages an ungated block changes the width with stride 2.
    """

    widths: tuple[int, ...] = (12, 24)
    blocks: tuple[int, ...] = (3, 3)
    in_channels: int = 1
    num_classes: int = 10

    def __post_init__(self) -> None:
        if not self.widths or len(self.widths) != len(self.blocks) or min(self.blocks) < 1:
            raise ValueError(
                "`widths` and `blocks` must have the same length, with at least one gated block "
                f"per stage; got widths {self.widths} and blocks {self.blocks}."
            )


def build_skip_network(config: SkipConfig, *, image_shape: Sequence[int]) -> SkipNetwork:
    """The :class:`SkipNetwork` of ``config`` for images of ``image_shape`` (C, H, W)."""
    blocks: list[nn.Module] = []
    gates: list[SkipGate | None] = []
    channels = config.widths[0]
    for stage, (width, count) in enumerate(zip(config.widths, config.blocks, strict=True)):
        if stage > 0:
            blocks.append(BasicBlock(channels, width, 2))  # changes the shape: always runs
            gates.append(None)
        for _ in range(count):  # the gated blocks of this stage
            blocks.append(BasicBlock(width, width))
            gates.append(SkipGate(width))
        channels = width
    return SkipNetwork(
        _stem(config.in_channels, config.widths[0]),
        blocks,
        gates,
        ClassifierHead(channels, config.num_classes),
        input_shape=tuple(image_shape),
    )
