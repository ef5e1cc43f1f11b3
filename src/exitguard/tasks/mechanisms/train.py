"""Training the mechanisms' models once, on the training split, and caching them.

The multi-exit CNN is the classification demo's (:func:`exitguard.tasks.classification.prepare`
trains or loads it); here come the cascade's smaller members, the halting units on top of the
CNN, and the skip network. Each goes through :func:`exitguard.tasks.common.cached_model`, keyed
by everything that determines its weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from exitguard.data.images import ImageDataset
from exitguard.nn import EarlyExitNetwork
from exitguard.nn.halting import HaltingNetwork, HaltingTrainConfig, train_halting
from exitguard.nn.io import stored_tensors
from exitguard.nn.skipping import SkipNetwork, SkipTrainConfig, train_skipping
from exitguard.tasks.classification import TrainSettings
from exitguard.tasks.common import CachedModel, ModelCache, train_jointly
from exitguard.tasks.mechanisms.models import (
    SkipConfig,
    SmallCNNConfig,
    build_skip_network,
    build_small_cnn,
)

CACHE_FORMAT = "exitguard.mechanisms/1"


@dataclasses.dataclass(frozen=True)
class MechanismSettings:
    """Architectures and training of the mechanisms' own models for one dataset.

    Attributes
    ----------
    cascade : tuple of SmallCNNConfig
        The cascade's members before the classifier (cheapest first).
    cascade_train : TrainSettings
    halting_hidden : int
        Width of the halting units' hidden layer.
    halting_train : HaltingTrainConfig
    skip : SkipConfig
    skip_train : SkipTrainConfig
    max_train : int or None
        Train the cascade members and the skip network on at most this many training images.
    """

    cascade: tuple[SmallCNNConfig, ...]
    cascade_train: TrainSettings
    halting_hidden: int
    halting_train: HaltingTrainConfig
    skip: SkipConfig
    skip_train: SkipTrainConfig
    max_train: int | None = None


def mechanism_settings(dataset: str, *, quick: bool = False, seed: int = 0) -> MechanismSettings:
    """The settings the demo and the benchmark use for ``dataset``."""
    if dataset == "digits":
        # 8 x 8 images: thin members; a skip network of about the classifier's cost.
        cascade = (
            SmallCNNConfig(widths=(8,), strides=(2,)),
            SmallCNNConfig(widths=(8, 16), strides=(1, 2)),
        )
        cascade_train = TrainSettings(epochs=4 if quick else 12, batch_size=64, lr=3e-3)
        skip = SkipConfig(widths=(12, 24), blocks=(3, 3))
        skip_train = SkipTrainConfig(
            epochs=4 if quick else 16, warmup_epochs=1 if quick else 4, compute_weight=2.0
        )
        max_train = None
    else:
        cascade = (
            SmallCNNConfig(widths=(8,), strides=(2,)),
            SmallCNNConfig(widths=(16, 24), strides=(2, 1)),
        )
        cascade_train = TrainSettings(epochs=2 if quick else 4, batch_size=128, lr=2e-3)
        skip = SkipConfig(widths=(12, 24, 32), blocks=(2, 2, 2))
        skip_train = SkipTrainConfig(
            epochs=2 if quick else 4,
            warmup_epochs=1,
            batch_size=128,
            lr=2e-3,
            compute_weight=2.0,
        )
        max_train = 6000 if quick else 20000
    return MechanismSettings(
        cascade=cascade,
        cascade_train=dataclasses.replace(cascade_train, seed=seed),
        halting_hidden=32,
        halting_train=HaltingTrainConfig(epochs=10 if quick else 60, ponder_cost=0.1, seed=seed),
        skip=skip,
        skip_train=dataclasses.replace(skip_train, seed=seed),
        max_train=max_train,
    )


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's stored tensors (names, shapes, bytes): identifies its weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(stored_tensors(module).items()):
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype};".encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _training_part(train: ImageDataset, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    if limit is None:
        return train.images, train.labels
    return train.images[:limit], train.labels[:limit]


Architecture = TypeVar("Architecture", SmallCNNConfig, SkipConfig)


def _shaped_for(config: Architecture, train: ImageDataset) -> Architecture:
    """``config`` with the input channels and the classes of ``train``."""
    return dataclasses.replace(
        config, in_channels=train.image_shape[0], num_classes=train.num_classes
    )


def load_or_train_member(
    train: ImageDataset,
    *,
    config: SmallCNNConfig,
    settings: TrainSettings,
    max_train: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> CachedModel[nn.Module]:
    """A cascade member (a single-exit CNN) trained on ``train``, or loaded from the cache."""
    config = _shaped_for(config, train)

    def fit(module: nn.Module) -> dict[str, Any]:
        images, labels = _training_part(train, max_train)
        network = EarlyExitNetwork([module], [], input_shape=train.image_shape)  # one exit
        return train_jointly(network, images, labels, settings=settings, progress=progress)

    entry = ModelCache("cascade-member", CACHE_FORMAT).entry(
        train, model=config, train=settings, role="cascade member", max_train=max_train
    )
    return entry.load_or_train(lambda: build_small_cnn(config), fit, cache_dir=cache_dir, log=log)


@dataclasses.dataclass(frozen=True)
class HaltingUnits:
    """What determines the halting units' architecture: their width and the network's weights."""

    hidden: int
    network: str


def load_or_train_halting(
    network: EarlyExitNetwork,
    train: ImageDataset,
    *,
    hidden: int,
    config: HaltingTrainConfig,
    exit_cost: np.ndarray,
    cache_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] = print,
) -> CachedModel[HaltingNetwork]:
    """Halting units trained on top of the frozen ``network``, or loaded from the cache.

    The cache entry holds the units only and is keyed by the network's weights.
    """
    example = torch.from_numpy(train.images[:1])

    def build() -> nn.ModuleList:
        return HaltingNetwork.attach(network, example, hidden=hidden).units

    def fit(units: nn.ModuleList) -> dict[str, Any]:
        model = HaltingNetwork(network, list(units))  # type: ignore[arg-type]
        history = train_halting(
            model,
            torch.from_numpy(train.images),
            train.labels,
            config=config,
            exit_cost=exit_cost,
        )
        return {"history": history.to_dict()}

    entry = ModelCache("halting", CACHE_FORMAT).entry(
        train,
        model=HaltingUnits(hidden=hidden, network=weights_digest(network)),
        train=config,
        role="halting units",
        exit_cost=[float(c) for c in exit_cost],
    )
    cached = entry.load_or_train(build, fit, cache_dir=cache_dir, log=log)
    model = HaltingNetwork(network, list(cached.module)).eval()  # type: ignore[arg-type]
    return CachedModel(model, cached.metadata, cached.from_cache)


def load_or_train_skipping(
    train: ImageDataset,
    *,
    config: SkipConfig,
    settings: SkipTrainConfig,
    max_train: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] = print,
) -> CachedModel[SkipNetwork]:
    """The skip network trained with its gates on ``train``, or loaded from the cache."""
    config = _shaped_for(config, train)

    def build() -> SkipNetwork:
        return build_skip_network(config, image_shape=train.image_shape)

    def fit(network: SkipNetwork) -> dict[str, Any]:
        images, labels = _training_part(train, max_train)
        history = train_skipping(
            network, torch.from_numpy(images), torch.from_numpy(labels), config=settings
        )
        return {"history": history.to_dict()}

    entry = ModelCache("skip-network", CACHE_FORMAT).entry(
        train, model=config, train=settings, role="skip network", max_train=max_train
    )
    return entry.load_or_train(build, fit, cache_dir=cache_dir, log=log)
