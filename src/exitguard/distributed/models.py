"""Models as they travel to workers: safetensors bytes and a JSON description, never pickle.

A :class:`ModelPayload` holds the weights as safetensors bytes and a factory (``"module:name"``,
importable on every worker) with JSON arguments that builds the same architecture. The driver
puts the bytes into Ray's object store once (one copy per node, shared by the actors there);
each actor builds the architecture, loads the weights and checks the architecture fingerprint
before it computes anything. Weights are checked by their sha256, which also enters the run
description, so a shard folder is only resumed with the same weights.

Why bytes through the object store and not a path: the workers of a cluster need not share a
file system with the driver, and the same code serves a laptop and a cluster. (The model cache
of :mod:`exitguard.tasks.common` writes the same safetensors format; :meth:`ModelPayload.from_file`
reads a cache entry or any weights file.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn


def _safetensors() -> Any:
    import safetensors.torch

    return safetensors.torch


def _state_bytes(module: nn.Module) -> bytes:
    """The module's state as safetensors bytes; tensors shared between modules are copied."""
    state = {name: t.detach().cpu().contiguous().clone() for name, t in module.state_dict().items()}
    return bytes(_safetensors().save(state))


def architecture_fingerprint(module: nn.Module) -> str:
    """The module's own ``fingerprint`` when it has one, else a hash of its tensor names and
    shapes."""
    own = getattr(module, "fingerprint", None)
    if isinstance(own, str):
        return own
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)};".encode())
    return digest.hexdigest()[:16]


def resolve_factory(factory: str) -> Any:
    """The callable named ``"package.module:name"``."""
    if not isinstance(factory, str) or factory.count(":") != 1:
        raise ValueError(f"`factory` must be 'package.module:function'; got {factory!r}.")
    module_name, name = factory.split(":")
    try:
        target = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"`factory` {factory!r} cannot be imported here ({error}).") from error
    if not callable(target):
        raise ValueError(f"`factory` {factory!r} is not callable.")
    return target


@dataclasses.dataclass(frozen=True, repr=False)
class ModelPayload:
    """A trained module as weights (safetensors bytes) plus how to build its architecture.

    Attributes
    ----------
    factory : str
        ``"package.module:function"``; ``function(**arguments)`` returns the untrained module.
    arguments : dict
        JSON-ready keyword arguments of the factory.
    weights : bytes
        ``safetensors.torch.save`` of the module's state dict.
    fingerprint : str
        The architecture fingerprint the built module must have.
    optimize : bool
        After loading, rewrite the network with
        :func:`exitguard.nn.optimize_for_inference` (BatchNorm folded), as the driver serves
        it, so that workers compute what the driver would.
    """

    factory: str
    arguments: Mapping[str, Any]
    weights: bytes
    fingerprint: str
    optimize: bool = False

    def __post_init__(self) -> None:
        try:
            canonical = json.loads(json.dumps(dict(self.arguments), allow_nan=False))
        except (TypeError, ValueError) as error:
            raise TypeError(f"`arguments` must be JSON-serialisable ({error}).") from error
        object.__setattr__(self, "arguments", canonical)
        if not isinstance(self.weights, bytes):
            raise TypeError(f"`weights` must be bytes; got {type(self.weights).__name__}.")

    @classmethod
    def of(
        cls,
        module: nn.Module,
        *,
        factory: str,
        arguments: Mapping[str, Any] | None = None,
        optimize: bool = False,
    ) -> ModelPayload:
        """The payload of a trained ``module`` that ``factory(**arguments)`` rebuilds."""
        if not isinstance(module, nn.Module):
            raise TypeError(f"`module` must be an nn.Module; got {type(module).__name__}.")
        resolve_factory(factory)
        return cls(
            factory=factory,
            arguments=dict(arguments or {}),
            weights=_state_bytes(module),
            fingerprint=architecture_fingerprint(module),
            optimize=optimize,
        )

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        *,
        factory: str,
        arguments: Mapping[str, Any] | None = None,
    ) -> ModelPayload:
        """The payload of a safetensors weights file (e.g. a model-cache entry)."""
        payload = cls(factory=factory, arguments=dict(arguments or {}), weights=b"", fingerprint="")
        module = payload.build(weights=Path(path).read_bytes(), check=False)
        return cls.of(module, factory=factory, arguments=payload.arguments)

    @property
    def sha256(self) -> str:
        """Hash of the weights."""
        return hashlib.sha256(self.weights).hexdigest()

    def describe(self) -> dict[str, Any]:
        """What identifies the model in a run description (JSON)."""
        return {
            "factory": self.factory,
            "arguments": dict(self.arguments),
            "fingerprint": self.fingerprint,
            "weights_sha256": self.sha256,
            "optimize": self.optimize,
        }

    def light(self) -> ModelPayload:
        """This payload without its weights (what travels inside a worker; the bytes travel
        once per node through the object store and are passed to :meth:`build`)."""
        return dataclasses.replace(self, weights=b"")

    def __repr__(self) -> str:
        return (
            f"ModelPayload({self.factory!r}, fingerprint={self.fingerprint!r}, "
            f"weights={len(self.weights)} bytes)"
        )

    def build(self, *, weights: bytes | None = None, check: bool = True) -> nn.Module:
        """Build the architecture, load the weights, eval mode, no gradients.

        ``weights`` replaces :attr:`weights` (a worker passes the bytes it got from the object
        store). Raises ValueError when the built module's fingerprint or tensors differ.
        """
        module = resolve_factory(self.factory)(**self.arguments)
        if not isinstance(module, nn.Module):
            raise ValueError(
                f"`factory` {self.factory!r} must return an nn.Module; got {type(module).__name__}."
            )
        if check and architecture_fingerprint(module) != self.fingerprint:
            raise ValueError(
                f"`factory` {self.factory!r} built an architecture with fingerprint "
                f"{architecture_fingerprint(module)!r} here; the payload's is "
                f"{self.fingerprint!r} (different code or versions on this worker?)."
            )
        state = _safetensors().load(self.weights if weights is None else weights)
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"the weights do not fit the architecture of {self.factory!r}: missing "
                f"{sorted(missing)}, unexpected {sorted(unexpected)}."
            )
        module.eval()
        module.requires_grad_(False)
        if self.optimize:
            from exitguard.nn import EarlyExitNetwork, optimize_for_inference

            if not isinstance(module, EarlyExitNetwork):
                raise ValueError(
                    f"`optimize` needs an EarlyExitNetwork; {self.factory!r} built a "
                    f"{type(module).__name__}."
                )
            module, _ = optimize_for_inference(module)
        return module


# ------------------------------------------------------------------ factories of the tasks


def denoiser(config: Mapping[str, Any]) -> nn.Module:
    """A :class:`~exitguard.tasks.diffusion.model.Denoiser` from its config as a dict."""
    from exitguard.tasks.diffusion.model import Denoiser, DenoiserConfig

    return Denoiser(DenoiserConfig(**config))


def denoiser_payload(model: Any) -> ModelPayload:
    """The payload of a trained :class:`~exitguard.tasks.diffusion.model.Denoiser`."""
    config = dataclasses.asdict(model.config)
    return ModelPayload.of(model, factory=f"{__name__}:denoiser", arguments={"config": config})


def classifier(
    config: Mapping[str, Any], image_shape: list[int], confidence: str = "max_softmax"
) -> nn.Module:
    """The classification task's multi-exit CNN from its :class:`CNNConfig` as a dict."""
    from exitguard.tasks.classification import CNNConfig, build_classifier

    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    network = build_classifier(CNNConfig(**fields), image_shape=tuple(image_shape))
    network.confidence = confidence
    return network


def classifier_payload(
    network: nn.Module, config: Any, *, image_shape: Any, optimize: bool = False
) -> ModelPayload:
    """The payload of a trained classifier of
    :func:`exitguard.tasks.classification.build_classifier` with ``config`` (a CNNConfig);
    ``optimize``: workers serve it BatchNorm-folded (see :class:`ModelPayload`)."""
    return ModelPayload.of(
        network,
        optimize=optimize,
        factory=f"{__name__}:classifier",
        arguments={
            "config": dataclasses.asdict(config),
            "image_shape": list(image_shape),
            "confidence": network.confidence,
        },
    )


def set_threads(threads: int) -> None:
    """Torch CPU threads of a worker (intra-op; inter-op stays as torch set it)."""
    torch.set_num_threads(threads)
