"""Pieces shared by the torch runners of the mechanisms (cascade, learned halting, skipping).

The cascade and learned halting apply the exit rule of :mod:`exitguard.risk.exits` to a
confidence per step, so their offline reference (:func:`simulate_exit_rule`) and their result
(:func:`exit_result`) are one implementation.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from exitguard.nn.network import InferenceResult
from exitguard.risk.exits import first_exit


def exit_result(
    out: Mapping[str, Tensor], threshold: float, *, measure: str, n_exits: int
) -> InferenceResult:
    """A batch's result from its per-sample ``logits``, ``probs``, ``confidence`` and ``exits``."""
    return InferenceResult(
        predictions=out["probs"].max(dim=1).indices,
        probs=out["probs"],
        logits=out["logits"],
        exits=out["exits"],
        confidence=out["confidence"],
        threshold=threshold,
        measure=measure,
        n_exits=n_exits,
    )


def simulate_exit_rule(
    logits: Tensor, confidences: Tensor, threshold: float, *, measure: str
) -> InferenceResult:
    """The exit rule applied to every step's outputs on every sample (the offline reference).

    ``logits`` (B, L, C) and ``confidences`` (B, L) of every step; a sample takes the first
    step whose confidence is >= ``threshold``, else the last.
    """
    exits = first_exit(confidences[:, :-1] >= threshold)  # (B,)
    rows = torch.arange(logits.shape[0], device=logits.device)
    out = {
        "logits": logits[rows, exits],
        "probs": logits.softmax(dim=2)[rows, exits],
        "confidence": confidences[rows, exits],
        "exits": exits,
    }
    return exit_result(out, threshold, measure=measure, n_exits=logits.shape[1])
