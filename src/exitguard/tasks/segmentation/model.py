"""The encoder-decoder segmenter with dense exits, trained jointly and cached."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

from torch import nn

from exitguard.data.images import ImageDataset
from exitguard.nn import DenseHead, EarlyExitNetwork
from exitguard.nn.blocks import BasicBlock, BilinearResize
from exitguard.tasks.common import CachedModel, ModelCache, train_jointly

CACHE_FORMAT = "exitguard.segmenter/2"  # 2: stride-2 stem, exits decided at low resolution
MODELS = ModelCache("segmenter", CACHE_FORMAT)  # cache entries "segmenter-<dataset>-<key>"


@dataclasses.dataclass(frozen=True)
class SegmenterConfig:
    """An encoder-decoder segmenter: a strided encoder, dilated context blocks, dense exits.

    The stem is a stride-2 3x3 convolution, so no layer works at the full input resolution
    (a full-resolution first layer is memory-bound on CPU: it took 58 ms of a batch for 20
    MFLOPs per image, as long as a later stage of twice the FLOPs). Stage 0 (stem and a
    stride-2 block) reaches a quarter of the input resolution, where every later stage
    works, the last ones widening the context with dilated blocks. After every stage a
    dense head (a 1x1 hidden layer and a 1x1 classifier) decodes the features at that
    resolution; the exit is decided there, and only the logits of the images that leave are
    upsampled bilinearly to the input resolution (the network's ``resize``).
    """

    in_channels: int = 1
    widths: tuple[int, ...] = (24, 48, 64, 64)
    strides: tuple[int, ...] = (2, 1, 1, 1)
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
        if any(stride != 1 for stride in self.strides[1:]):
            raise ValueError(
                "`strides` after the first must be 1: every exit decides at one resolution "
                f"(the first stage's); got {self.strides}."
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
                nn.Conv2d(config.in_channels, config.stem_width, 3, 2, 1, bias=False),
                nn.BatchNorm2d(config.stem_width),
                nn.ReLU(),
            )
            stages.append(nn.Sequential(stem, block))
        else:
            stages.append(block)
        heads.append(DenseHead(out, num_classes, hidden_channels=config.head_width))
        channels = out
    resize = BilinearResize((height, width))
    return EarlyExitNetwork(stages, heads, input_shape=tuple(image_shape), resize=resize)


@dataclasses.dataclass(frozen=True)
class SegmenterTraining:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    distill: float = 0.5
    seed: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"


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

    entry = MODELS.entry(
        scenes, model=model_config, train=settings, architecture=build().fingerprint
    )
    return entry.load_or_train(build, fit, cache_dir=cache_dir, log=log)
