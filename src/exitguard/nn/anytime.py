"""Anytime prediction: the best answer a compute budget allows, and answers that refine.

An early-exit network is an anytime predictor: after stage ``e`` its exit ``e`` has an answer.
Two ways to use it, both with real compute savings:

- :meth:`AnytimeNetwork.infer` with a budget: each sample gets the deepest exit whose cost
  fits its budget, and only that exit's head runs (no confidence decisions on the way). A
  budget is in FLOPs per sample (``unit="flops"``), or in milliseconds per sample
  (``"ms"``) or per batch (``"batch_ms"``) as predicted by a measured
  :class:`~exitguard.nn.LatencyProfile`. A budget tensor (B,) gives each sample its own
  budget; the batch is compacted as samples reach theirs.
- :meth:`AnytimeNetwork.refine`, a generator that yields the refined prediction after every
  stage; stop iterating (an interrupt, a deadline) and the rest is never computed.

The certified view (in :mod:`exitguard.tasks.mechanisms.tables`) is the risk of the answer
available at each budget, against the full model, with an upper confidence bound per budget.

Cost of answering from exit ``e`` alone (:meth:`AnytimeNetwork.budget_cost`): stages ``0..e``
and head ``e``; the interruptible form pays every head on the way (``FlopsTable.to_exit``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from exitguard.nn._compaction import RowWriter
from exitguard.nn.flops import FlopsTable, count_flops
from exitguard.nn.latency import LatencyProfile
from exitguard.nn.network import EarlyExitNetwork

BudgetUnit = Literal["flops", "ms", "batch_ms"]
BUDGET_UNITS = ("flops", "ms", "batch_ms")


@dataclasses.dataclass(frozen=True, repr=False)
class AnytimeResult:
    """Per-sample outcome of :meth:`AnytimeNetwork.infer` (or ``simulate``).

    Attributes
    ----------
    predictions : Tensor (B,) int64
    probs, logits : Tensor (B, C)
    exits : Tensor (B,) int64
        The deepest exit each sample's budget allows.
    cost : Tensor (B,) float64
        What each sample's answer cost, in the budget's unit (per sample).
    unit : str
    """

    predictions: Tensor
    probs: Tensor
    logits: Tensor
    exits: Tensor
    cost: Tensor
    unit: str

    def __repr__(self) -> str:
        counts = torch.bincount(self.exits.cpu()).tolist()
        return (
            f"AnytimeResult(batch={self.exits.shape[0]}, exit_counts={counts}, unit={self.unit!r})"
        )


@dataclasses.dataclass(frozen=True, repr=False)
class AnytimeStep:
    """The answer after one stage of :meth:`AnytimeNetwork.refine`.

    Attributes
    ----------
    exit : int
    logits, probs : Tensor (B, C)
    predictions : Tensor (B,)
    flops : int
        FLOPs per sample spent so far (every stage and head up to this exit).
    """

    exit: int
    logits: Tensor
    probs: Tensor
    predictions: Tensor
    flops: int

    def __repr__(self) -> str:
        return (
            f"AnytimeStep(exit={self.exit}, batch={self.predictions.shape[0]}, flops={self.flops})"
        )


class AnytimeNetwork(nn.Module):
    """An early-exit network answered within a compute budget.

    Parameters
    ----------
    network : EarlyExitNetwork
    example_input : Tensor (N, ...)
        One sample is used to count FLOPs (:func:`exitguard.nn.count_flops`).
    profile : LatencyProfile, optional
        Measured stage and head times; required for budgets in milliseconds.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from exitguard.nn import AnytimeNetwork, EarlyExitNetwork
    >>> network = EarlyExitNetwork([nn.Linear(4, 8), nn.Linear(8, 8)], [nn.Linear(8, 3)] * 2)
    >>> anytime = AnytimeNetwork(network, torch.randn(1, 4))
    >>> anytime.budget_cost().tolist()  # FLOPs of answering from each exit alone
    [112.0, 240.0]
    >>> anytime.infer(torch.randn(3, 4), budget=200).exits.tolist()
    [0, 0, 0]
    >>> [step.exit for step in anytime.refine(torch.randn(3, 4))]
    [0, 1]
    """

    def __init__(
        self,
        network: EarlyExitNetwork,
        example_input: Tensor,
        *,
        profile: LatencyProfile | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(network, EarlyExitNetwork):
            raise TypeError(f"`network` must be an EarlyExitNetwork; got {type(network).__name__}.")
        if profile is not None:
            if not isinstance(profile, LatencyProfile):
                raise TypeError(
                    f"`profile` must be a LatencyProfile; got {type(profile).__name__}."
                )
            if profile.n_exits != network.n_exits:
                raise ValueError(
                    f"`profile` was measured on a network with {profile.n_exits} exits; this one "
                    f"has {network.n_exits}."
                )
        self.network = network
        self.flops: FlopsTable = count_flops(network, example_input)
        self.profile = profile

    @property
    def n_exits(self) -> int:
        return self.network.n_exits

    def budget_cost(
        self, unit: BudgetUnit = "flops", *, batch_size: int = 1
    ) -> NDArray[np.float64]:
        """(L,) cost per sample of answering from exit ``e`` alone: stages ``0..e`` and head ``e``.

        In FLOPs, or in milliseconds per sample (``"ms"``) or per batch (``"batch_ms"``) for a
        batch of ``batch_size`` samples, as the latency profile predicts them. The per-sample
        cost increases with ``e``.
        """
        if unit not in BUDGET_UNITS:
            raise ValueError(
                f"`unit` must be one of {', '.join(map(repr, BUDGET_UNITS))}; got {unit!r}."
            )
        if unit == "flops":
            stages = np.cumsum(self.flops.stage, dtype=np.float64)
            return stages + np.asarray(self.flops.head, dtype=np.float64) + self.flops.output
        if self.profile is None:
            raise ValueError(
                f"a budget in {unit!r} needs a latency profile: AnytimeNetwork(network, x, "
                "profile=profile_latency(network, x))."
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer; got {batch_size!r}.")
        # The profile's own interpolation in the batch size (ms per call at that size).
        stage_ms = self.profile._at(self.profile.stage_ms, batch_size)  # (L,)
        head_ms = self.profile._at(self.profile.head_ms, batch_size)  # (L,)
        batch = np.cumsum(stage_ms) + head_ms  # (L,) ms of the batch
        return batch if unit == "batch_ms" else batch / batch_size

    def exit_for_budget(
        self, budget: float | Tensor, *, unit: BudgetUnit = "flops", batch_size: int = 1
    ) -> Tensor:
        """The deepest exit whose cost fits ``budget`` (a number, or a tensor of budgets).

        Raises
        ------
        ValueError
            When a budget is below the cost of the first exit (no answer fits) or not finite
            and positive.
        """
        cost = torch.as_tensor(self.budget_cost(unit, batch_size=batch_size))  # (L,) float64
        if isinstance(budget, bool) or not isinstance(budget, (int, float, Tensor)):
            raise TypeError(
                f"`budget` must be a number or a tensor of per-sample budgets; got "
                f"{type(budget).__name__}."
            )
        budgets = torch.as_tensor(budget, dtype=torch.float64).cpu()
        if not bool(torch.isfinite(budgets).all()):
            raise ValueError(f"`budget` must be finite; got {budget!r}.")
        if bool((budgets < cost[0]).any()):
            smallest = float(budgets.min())
            raise ValueError(
                f"`budget` must allow at least the first exit, which costs {float(cost[0]):.6g} "
                f"{unit}; got {smallest:.6g}."
            )
        # Costs increase along the exits: the number that fit, minus one, is the deepest exit.
        return torch.searchsorted(cost, budgets.reshape(-1), right=True).reshape(budgets.shape) - 1

    def _per_sample_exits(self, x: Tensor, budget: float | Tensor, unit: BudgetUnit) -> Tensor:
        self.network.check_input(x)
        exits = self.exit_for_budget(budget, unit=unit, batch_size=x.shape[0])
        if exits.ndim == 0:
            return exits.expand(x.shape[0]).to(x.device)
        if exits.shape != (x.shape[0],):
            raise ValueError(
                f"`budget` must be one number or one per sample ({x.shape[0]},); got shape "
                f"{tuple(exits.shape)}."
            )
        return exits.to(x.device)

    def _result(self, out: dict[str, Tensor], unit: BudgetUnit, batch_size: int) -> AnytimeResult:
        cost = torch.as_tensor(self.budget_cost(unit, batch_size=batch_size))
        return AnytimeResult(
            predictions=out["probs"].max(dim=1).indices,
            probs=out["probs"],
            logits=out["logits"],
            exits=out["exits"],
            cost=cost[out["exits"].cpu()].to(out["exits"].device),
            unit=unit,
        )

    @torch.inference_mode()
    def infer(
        self, x: Tensor, *, budget: float | Tensor, unit: BudgetUnit = "flops"
    ) -> AnytimeResult:
        """Answer every sample from the deepest exit its budget allows, with real skipping.

        Stages run on the samples whose budget reaches them; only the exit head a sample
        answers from runs for it. ``budget`` is one number or a tensor (B,) of per-sample
        budgets in ``unit`` (milliseconds are predicted by the latency profile at this batch
        size). Equal to :meth:`simulate`.
        """
        exits = self._per_sample_exits(x, budget, unit)  # (B,)
        rows = torch.arange(x.shape[0], device=x.device)  # (A,) batch rows still running
        writer = RowWriter(x.shape[0])
        h, wanted = x, exits
        for index, head in enumerate(self.network.heads):
            h = self.network._run_stage(index, h)  # (A, ...)
            stop = wanted == index  # (A,)
            if not bool(stop.any()):
                continue
            logits = head(h[stop])  # (S, C) only the samples answering here
            writer.write(
                rows[stop],
                {"logits": logits, "probs": logits.softmax(dim=1), "exits": wanted[stop]},
            )
            if writer.complete:
                break
            keep = ~stop  # compact: only samples with budget left go on
            rows, h, wanted = rows[keep], h[keep], wanted[keep]
        return self._result(writer.result(), unit, x.shape[0])

    @torch.inference_mode()
    def simulate(
        self, x: Tensor, *, budget: float | Tensor, unit: BudgetUnit = "flops"
    ) -> AnytimeResult:
        """The offline reference for :meth:`infer`: every exit on every sample, then the budget."""
        exits = self._per_sample_exits(x, budget, unit)  # (B,)
        logits = self.network(x)  # (B, L, C)
        rows = torch.arange(x.shape[0], device=x.device)
        chosen = logits[rows, exits]  # (B, C)
        out = {"logits": chosen, "probs": chosen.softmax(dim=1), "exits": exits}
        return self._result(out, unit, x.shape[0])

    @torch.inference_mode()
    def refine(self, x: Tensor) -> Iterator[AnytimeStep]:
        """Yield the answer after every stage; stop iterating to interrupt.

        Each step runs one more stage and its exit head on the whole batch; nothing beyond the
        last step taken is computed. ``flops`` counts every stage and head so far.

        Examples
        --------
        >>> for step in anytime.refine(x):           # doctest: +SKIP
        ...     answer = step.predictions
        ...     if time.perf_counter() > deadline:
        ...         break
        """
        self.network.check_input(x)
        spent = self.flops.to_exit
        h = x
        for index, head in enumerate(self.network.heads):
            h = self.network._run_stage(index, h)
            logits = head(h)  # (B, C)
            probs = logits.softmax(dim=1)
            yield AnytimeStep(
                exit=index,
                logits=logits,
                probs=probs,
                predictions=probs.max(dim=1).indices,
                flops=int(spent[index]),
            )

    def extra_repr(self) -> str:
        return f"n_exits={self.n_exits}, profile={'yes' if self.profile is not None else 'no'}"
