"""Every mechanism's loss and cost tables on one set of samples.

Branch exits, the cascade and learned halting apply the exit rule to a confidence, so one
pass that keeps every step's output gives their whole table
(:func:`~exitguard.tasks.mechanisms.tables.exit_rule_table`); anytime prediction reads the
same per-exit outputs at fixed budgets; layer skipping changes every later gate's input with
each decision, so its table comes from one real pass per threshold (:func:`skipping_table`).
Costs are FLOPs counted with torch's counter, decisions included.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from torch import Tensor

from exitguard.nn import FlopsTable
from exitguard.nn.anytime import AnytimeNetwork
from exitguard.nn.cascade import Cascade, CascadeFlops
from exitguard.nn.halting import HaltingNetwork
from exitguard.nn.skipping import SkipFlops, SkipNetwork
from exitguard.tasks.mechanisms.tables import (
    RISKS,
    MechanismTable,
    budget_table,
    config_table,
    exit_rule_table,
)


def _batched_confidences(
    model: Cascade | HaltingNetwork, images: Tensor, batch_size: int
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Every step's probabilities (n, L, C) and confidences (n, L), float64, in eval mode."""
    model.eval()
    probs, conf = [], []
    for batch in torch.split(images, batch_size):  # batches bound memory
        logits, scores = model.exit_confidences(batch)  # (b, L, C), (b, L)
        probs.append(logits.softmax(dim=2).double())
        conf.append(scores)
    return torch.cat(probs).numpy(), torch.cat(conf).numpy()


def _flops_rule_table(
    mechanism: str,
    confidences: ArrayLike,
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    flops: FlopsTable | CascadeFlops,
    risks: Sequence[str],
    parameter: str = "threshold",
) -> MechanismTable:
    """The exit rule's table with FLOPs as the cost: stopping at exit ``e`` costs ``to_exit[e]``."""
    return exit_rule_table(
        mechanism,
        confidences,
        probs,
        labels,
        risks=risks,
        exit_cost=flops.to_exit.astype(np.float64),
        full_cost=float(flops.full),
        parameter=parameter,
    )


def branch_table(
    probs: ArrayLike,
    confidences: ArrayLike,
    labels: ArrayLike,
    *,
    flops: FlopsTable,
    risks: Sequence[str] = RISKS,
) -> MechanismTable:
    """Branch exits with the network's softmax confidence (the classification demo's policy)."""
    return _flops_rule_table("branch exits", confidences, probs, labels, flops=flops, risks=risks)


def cascade_table(
    cascade: Cascade,
    images: Tensor,
    labels: ArrayLike,
    *,
    flops: CascadeFlops,
    risks: Sequence[str] = RISKS,
    batch_size: int = 256,
) -> MechanismTable:
    """A cascade's table: every model on every sample once, then every threshold."""
    probs, conf = _batched_confidences(cascade, images, batch_size)
    return _flops_rule_table("cascade", conf, probs, labels, flops=flops, risks=risks)


def halting_table(
    halting: HaltingNetwork,
    images: Tensor,
    labels: ArrayLike,
    *,
    flops: FlopsTable,
    risks: Sequence[str] = RISKS,
    batch_size: int = 256,
) -> MechanismTable:
    """Learned halting's table: threshold ``1 - lambda`` on the cumulative halting probability.

    ``flops`` from :meth:`HaltingNetwork.count_flops` (heads and halting units included).
    """
    probs, conf = _batched_confidences(halting, images, batch_size)
    return _flops_rule_table(
        "learned halting",
        conf,
        probs,
        labels,
        flops=flops,
        risks=risks,
        parameter="threshold (1 - lambda)",
    )


def anytime_table(
    anytime: AnytimeNetwork,
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    risks: Sequence[str] = RISKS,
) -> MechanismTable:
    """Anytime prediction at each exit's FLOPs budget (``probs`` (n, L, C) of every exit)."""
    return budget_table(probs, labels, risks=risks, budget_cost=anytime.budget_cost("flops"))


def skip_thresholds(
    network: SkipNetwork, images: Tensor, *, count: int = 30, batch_size: int = 256
) -> NDArray[np.float64]:
    """A grid of skip thresholds from the gate scores on ``images`` (training data).

    ``0`` (every block runs) then ``count`` quantiles of all gate scores on the full model's
    path, levels evenly spread in [0.02, 0.98]; duplicates are dropped. Place it on data
    that is not the calibration data, so the grid is fixed before calibration.
    """
    network.eval()
    scores = torch.cat([network.gate_scores(b) for b in torch.split(images, batch_size)])
    levels = np.quantile(scores.double().numpy().ravel(), np.linspace(0.02, 0.98, count))
    grid = np.unique(np.clip(levels, 1e-6, 1.0))
    return np.concatenate([[0.0], grid])


def skipping_table(
    network: SkipNetwork,
    images: Tensor,
    labels: ArrayLike,
    *,
    thresholds: ArrayLike,
    flops: SkipFlops,
    risks: Sequence[str] = RISKS,
    batch_size: int = 256,
) -> MechanismTable:
    """Layer skipping's table: one real pass (:meth:`SkipNetwork.infer`) per threshold.

    ``thresholds`` must start at 0 (every block, the full model) and increase.
    """
    grid = np.asarray(thresholds, dtype=np.float64)
    if grid.ndim != 1 or grid.size < 2 or grid[0] != 0.0 or np.any(np.diff(grid) <= 0):
        raise ValueError(
            "`thresholds` must be increasing skip thresholds starting at 0 (the full model); "
            f"got {np.array2string(grid[:6], precision=3)}."
        )
    if grid.max() > 1.0:
        raise ValueError(f"`thresholds` must lie in [0, 1]; got a maximum of {grid.max():g}.")
    network.eval()
    probs, cost = [], []
    for threshold in grid:  # one pass per configuration: decisions change the later inputs
        outs = [network.infer(batch, float(threshold)) for batch in torch.split(images, batch_size)]
        probs.append(torch.cat([o.probs for o in outs]).double())  # (n, C)
        ran = torch.cat([o.ran for o in outs]).numpy()  # (n, G)
        cost.append(flops.cost(ran, gates_run=threshold > 0))  # (n,)
    return config_table(
        "layer skipping",
        torch.stack(probs, dim=1).numpy(),  # (n, K, C)
        labels,
        risks=risks,
        cost=np.stack(cost),
        values=grid,
        parameter="gate threshold",
        ordered=False,
    )
