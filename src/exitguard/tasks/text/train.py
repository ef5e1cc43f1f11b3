"""Training the text network's exits, and caching the result.

Two modes, both seeded:

- ``"heads"``: the encoder stays frozen. Its pooled features at every layer are computed
  once for the training set (:func:`~exitguard.tasks.text.model.pooled_features`), and the
  heads' classifiers train on them for many epochs in seconds; exactly what training the
  heads on the frozen network would do, without re-running the encoder every epoch.
- ``"joint"``: the heads are trained as above first, then the encoder and the heads are
  fine-tuned together with :func:`exitguard.nn.train_exits` (per-exit loss weights, by
  default growing with depth as in PABEE, and self-distillation from the last exit).

:func:`load_or_train` caches the trained parts under the model cache (safetensors plus a
JSON description, :func:`exitguard.tasks.common.cached_model`): the heads alone in
``"heads"`` mode (the encoder is the installed one), the whole network in ``"joint"`` mode.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from exitguard.nn import EarlyExitNetwork, TrainConfig, exit_losses, train_exits
from exitguard.nn._modes import kept_modes
from exitguard.risk._validation import check_ints
from exitguard.tasks.common import ModelCache, progress_bar
from exitguard.tasks.text.data import TextDataset
from exitguard.tasks.text.model import (
    TextHeadConfig,
    build_text_network,
    encode_texts,
    encoder_fingerprint,
    load_encoder,
    pooled_features,
)

CACHE_FORMAT = "exitguard.text-classifier/1"
Mode = Literal["heads", "joint"]


@dataclasses.dataclass(frozen=True)
class TextTrainSettings:
    """How the text network's exits are trained.

    Attributes
    ----------
    mode : {"heads", "joint"}
        Heads only on the frozen encoder, or heads first and then joint fine-tuning.
    head_epochs, head_lr, head_batch_size
        AdamW on the heads' classifiers over the cached features.
    joint_epochs, joint_lr, joint_batch_size
        AdamW on everything (``"joint"`` only).
    loss_weights : tuple of float, optional
        Per-exit weights of the joint objective; default ``1, 2, ..., L`` (PABEE).
    distill, temperature
        Self-distillation from the last exit in joint fine-tuning.
    weight_decay : float
    max_length : int
        Sentences are truncated to this many tokens.
    seed : int
    """

    mode: Mode = "heads"
    head_epochs: int = 40
    head_lr: float = 3e-3
    head_batch_size: int = 128
    joint_epochs: int = 2
    joint_lr: float = 3e-5
    joint_batch_size: int = 32
    loss_weights: tuple[float, ...] | None = None
    distill: float = 0.5
    temperature: float = 2.0
    weight_decay: float = 1e-4
    max_length: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("heads", "joint"):
            raise ValueError(f"`mode` must be 'heads' or 'joint'; got {self.mode!r}.")
        check_ints(self, ("head_epochs", "head_batch_size", "joint_epochs", "joint_batch_size"))
        for name in ("head_lr", "joint_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"`{name}` must be a positive number; got {value!r}.")


def train_heads(
    network: EarlyExitNetwork,
    features: Tensor,
    labels: Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, list[Any]]:
    """Train every exit head's classifier on pooled features; the encoder is not touched.

    Parameters
    ----------
    network : EarlyExitNetwork
        From :func:`build_text_network`; its heads' ``classifier`` parts are trained.
    features : Tensor of shape (n, L, D)
        :func:`pooled_features` of the training texts.
    labels : Tensor of shape (n,)

    Returns
    -------
    dict
        ``loss`` (per epoch) and ``exit_accuracy`` (per epoch, per exit) on the training set.
    """
    n, n_exits = features.shape[:2]
    if labels.shape != (n,):
        raise ValueError(f"`labels` must have shape ({n},); got {tuple(labels.shape)}.")
    heads: list[Any] = list(network.heads)
    classifiers = nn.ModuleList([head.classifier for head in heads])
    if len(classifiers) != n_exits:
        raise ValueError(f"`features` has {n_exits} exits; the network has {len(classifiers)}.")
    weights = torch.ones(n_exits)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(classifiers.parameters(), lr=lr, weight_decay=weight_decay)
    history: dict[str, list[Any]] = {"loss": [], "exit_accuracy": []}
    with torch.random.fork_rng(devices=[]), kept_modes(classifiers):
        torch.manual_seed(seed)  # dropout
        classifiers.train()
        for _ in progress_bar(range(epochs), enabled=progress, desc="training the heads"):
            order = torch.randperm(n, generator=generator)
            total, correct = 0.0, torch.zeros(n_exits)
            for start in range(0, n, batch_size):
                index = order[start : start + batch_size]
                x, y = features[index], labels[index]  # (B, L, D), (B,)
                logits = torch.stack(
                    [c(x[:, e]) for e, c in enumerate(classifiers)], dim=1
                )  # (B, L, C)
                loss, _ = exit_losses(logits, y, weights=weights)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(index)
                correct += (logits.detach().argmax(dim=2) == y[:, None]).sum(dim=0)
            history["loss"].append(total / n)
            history["exit_accuracy"].append((correct / n).tolist())
    return history


@dataclasses.dataclass(frozen=True, repr=False)
class TrainedText:
    """A trained text network, the encoder it wraps, its tokenizer, its cache metadata and
    whether it came from the cache."""

    network: EarlyExitNetwork
    encoder: nn.Module
    tokenizer: Any
    metadata: dict[str, Any]
    from_cache: bool

    def __repr__(self) -> str:
        return (
            f"TrainedText(n_exits={self.network.n_exits}, from_cache={self.from_cache}, "
            f"mode={self.metadata.get('description', {}).get('train', {}).get('mode')!r})"
        )


def load_or_train(
    train: TextDataset,
    *,
    settings: TextTrainSettings,
    heads: TextHeadConfig | None = None,
    encoder_path: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainedText:
    """Train the exits of MiniLM (or the encoder at ``encoder_path``) on ``train``, or reuse
    a cached result of the same data, encoder, heads and settings.

    In ``"heads"`` mode the cache entry holds the heads only; in ``"joint"`` mode the whole
    network (encoder included).
    """
    heads = heads or TextHeadConfig()
    encoder, tokenizer = load_encoder(encoder_path)
    built: dict[str, Any] = {}
    num_classes = len(train.class_names)

    def build() -> nn.Module:
        # A fresh encoder for every build in joint mode: a failed cache load must not leave
        # half-loaded weights in the one that trains next.
        fresh = encoder if settings.mode == "heads" else load_encoder(encoder_path)[0]
        built["network"] = build_text_network(fresh, num_classes, heads=heads)
        built["encoder"] = fresh
        return built["network"].heads if settings.mode == "heads" else built["network"]

    def fit(module: nn.Module) -> dict[str, Any]:
        network = built["network"]
        tokens = encode_texts(tokenizer, train.texts, max_length=settings.max_length)
        labels = torch.from_numpy(train.labels)
        network.eval()
        features = torch.cat(
            [
                pooled_features(network, batch)
                for batch in progress_bar(
                    torch.split(tokens, 64), enabled=progress, desc="encoding the training set"
                )
            ]
        )  # (n, L, D)
        history = {
            "heads": train_heads(
                network,
                features,
                labels,
                epochs=settings.head_epochs,
                lr=settings.head_lr,
                batch_size=settings.head_batch_size,
                weight_decay=settings.weight_decay,
                seed=settings.seed,
                progress=progress,
            )
        }
        if settings.mode == "joint":
            n_exits = network.n_exits
            joint = train_exits(
                network,
                tokens,
                labels=labels,
                config=TrainConfig(
                    mode="joint",
                    epochs=settings.joint_epochs,
                    batch_size=settings.joint_batch_size,
                    lr=settings.joint_lr,
                    weight_decay=settings.weight_decay,
                    loss_weights=settings.loss_weights
                    or tuple(float(e) for e in range(1, n_exits + 1)),
                    distill=settings.distill,
                    temperature=settings.temperature,
                    seed=settings.seed,
                ),
                progress=progress,
            )
            history["joint"] = joint.to_dict()
        network.eval()
        return {"history": history, "n_train": len(train)}

    probe = build_text_network(encoder, num_classes, heads=heads)
    entry = ModelCache(f"text-{settings.mode}", CACHE_FORMAT).entry(
        train,
        model=heads,
        train=settings,
        encoder=encoder_fingerprint(encoder_path),
        architecture=probe.fingerprint,
        num_classes=num_classes,
    )
    cached = entry.load_or_train(build, fit, cache_dir=cache_dir, log=log)
    network = built["network"]
    network.eval()
    network.requires_grad_(False)
    return TrainedText(network, built["encoder"], tokenizer, cached.metadata, cached.from_cache)


def accuracy_per_exit(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(L,) accuracy of every exit from per-exit probabilities (n, L, C)."""
    return np.asarray((probs.argmax(-1) == labels[:, None]).mean(axis=0), dtype=np.float64)
