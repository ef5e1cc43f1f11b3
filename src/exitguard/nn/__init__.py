"""Early-exit networks in PyTorch: attach exits, train them, and run them with real skipping.

Needs the ``torch`` extra (``pip install "exitguard[torch]"``); :mod:`exitguard.risk` never
imports this package.

    network = attach_exits(backbone, at=["layer1", "layer2", "layer3"], input_shape=(3, 32, 32))
    train_exits(network, loader, config=TrainConfig(mode="heads", epochs=5))
    outputs = collect(network, calibration_loader)      # per-exit probs (n, L, C) + labels
    policy = network.bind_policy(exitguard.calibrate(outputs.probs, outputs.labels, ...))
    result = network.infer(x, policy)                  # really skips compute, any batch size

Mechanisms beyond branch exits, each with real savings and a full-pass ``simulate``:
:class:`Cascade`, :class:`HaltingNetwork`, :class:`AnytimeNetwork`, :class:`SkipNetwork`
(their tables and certification: :mod:`exitguard.tasks.mechanisms`).
"""

from __future__ import annotations

try:
    import torch as _torch  # noqa: F401
except ImportError as _error:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        'exitguard.nn needs PyTorch; install it with: pip install "exitguard[torch]"'
    ) from _error

from exitguard.nn.anytime import AnytimeNetwork, AnytimeResult, AnytimeStep
from exitguard.nn.attach import attach_exits, cut_into_stages
from exitguard.nn.blocks import BilinearResize
from exitguard.nn.cascade import Cascade, CascadeFlops
from exitguard.nn.collect import ExitOutputs, collect
from exitguard.nn.confidence import (
    CONFIDENCES,
    confidences,
    entropy,
    margin,
    max_softmax,
    patience,
)
from exitguard.nn.flops import FlopsTable, count_flops, flop_counter
from exitguard.nn.halting import HaltingNetwork, HaltingTrainConfig, HaltingUnit, train_halting
from exitguard.nn.heads import ClassifierHead, DenseHead
from exitguard.nn.io import load_policy, load_weights, save_policy, save_weights
from exitguard.nn.latency import (
    LatencyProfile,
    SpeedupMeasurement,
    measure_speedup,
    profile_latency,
)
from exitguard.nn.network import EarlyExitNetwork, InferenceResult, NonFiniteOutputWarning
from exitguard.nn.optimize import OptimizeReport, optimize_for_inference
from exitguard.nn.skipping import (
    SkipFlops,
    SkipGate,
    SkipNetwork,
    SkipResult,
    SkipTrainConfig,
    train_skipping,
)
from exitguard.nn.train import TrainConfig, TrainHistory, exit_losses, train_exits

__all__ = [
    "CONFIDENCES",
    "AnytimeNetwork",
    "AnytimeResult",
    "AnytimeStep",
    "BilinearResize",
    "Cascade",
    "CascadeFlops",
    "ClassifierHead",
    "DenseHead",
    "EarlyExitNetwork",
    "ExitOutputs",
    "FlopsTable",
    "HaltingNetwork",
    "HaltingTrainConfig",
    "HaltingUnit",
    "InferenceResult",
    "LatencyProfile",
    "NonFiniteOutputWarning",
    "OptimizeReport",
    "SkipFlops",
    "SkipGate",
    "SkipNetwork",
    "SkipResult",
    "SkipTrainConfig",
    "SpeedupMeasurement",
    "TrainConfig",
    "TrainHistory",
    "attach_exits",
    "collect",
    "confidences",
    "count_flops",
    "cut_into_stages",
    "entropy",
    "exit_losses",
    "flop_counter",
    "load_policy",
    "load_weights",
    "margin",
    "max_softmax",
    "measure_speedup",
    "optimize_for_inference",
    "patience",
    "profile_latency",
    "save_policy",
    "save_weights",
    "train_exits",
    "train_halting",
    "train_skipping",
]
