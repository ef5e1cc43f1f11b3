"""Learned halting (Adaptive Computation Time, PonderNet): a halting unit after every stage.

After stage ``l`` a small unit gives the probability ``h_l`` of halting there; the cumulative
halting probability ``c_l = 1 - prod_{j <= l} (1 - h_j)`` rises along the network, and a sample
stops at the first exit where ``c_l >= 1 - lambda`` (the last exit halts everything:
``h_{L-1} = 1``). That is the exit rule of :mod:`exitguard.risk.exits` with the cumulative
halting probability as the confidence and ``threshold = 1 - lambda``, so lambda is certified
exactly like a confidence threshold (the grid of thresholds is a grid of lambdas).

The units are trained with a ponder cost on top of a trained, frozen
:class:`~exitguard.nn.EarlyExitNetwork` (:func:`train_halting`): with ``p_l = h_l prod_{j<l}
(1 - h_j)`` the probability of halting exactly at ``l``, the objective is
``sum_l p_l loss_l + ponder_cost * sum_l p_l cost_l``: the expected loss plus the expected
compute (Graves, "Adaptive Computation Time for Recurrent Neural Networks", 2016; Banino,
Balaguer and Blundell, "PonderNet: Learning to Ponder", 2021).

    halting = HaltingNetwork.attach(network, x[:1])
    train_halting(halting, x_train, y_train, config=HaltingTrainConfig(ponder_cost=0.2))
    result = halting.infer(x, 1 - lam)           # real early exit on the halting probability
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exitguard.nn._compaction import RowWriter
from exitguard.nn._mechanism import exit_result, simulate_exit_rule
from exitguard.nn._modes import eval_mode
from exitguard.nn.flops import FlopsTable, _count, count_flops
from exitguard.nn.network import EarlyExitNetwork, InferenceResult
from exitguard.risk.exits import check_threshold

MEASURE = "cumulative_halting"
"""The confidence name of a halting network: the cumulative halting probability."""


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")
    return value


class HaltingUnit(nn.Module):
    """The probability of halting after one stage, from its features and its exit's output.

    The stage's features (B, F, *S) are averaged over positions to (B, F); the exit head's
    class probabilities are sorted in decreasing order (so the unit is class-agnostic); a
    two-layer MLP on both gives the halting probability in (0, 1).

    Parameters
    ----------
    in_features : int or None
        Channels of the stage's output (axis 1); None reads the exit's probabilities only
        (for stages whose output is not channels-first).
    num_classes : int
    hidden : int, default 32
    """

    def __init__(self, in_features: int | None, num_classes: int, *, hidden: int = 32) -> None:
        super().__init__()
        self.in_features = (
            None if in_features is None else _positive_int(in_features, "in_features")
        )
        self.num_classes = _positive_int(num_classes, "num_classes")
        width = (self.in_features or 0) + self.num_classes
        self.mlp = nn.Sequential(
            nn.Linear(width, _positive_int(hidden, "hidden")), nn.ReLU(), nn.Linear(hidden, 1)
        )

    def pool(self, features: Tensor) -> Tensor | None:
        """(B, F, *S) -> (B, F) by averaging over positions; None when features are not read."""
        if self.in_features is None:
            return None
        pooled = features.flatten(2).mean(dim=2) if features.ndim > 2 else features  # (B, F)
        if pooled.shape[1] != self.in_features:
            raise ValueError(
                f"the halting unit reads {self.in_features} feature channels (axis 1); got "
                f"features of shape {tuple(features.shape)}."
            )
        return pooled

    def from_pooled(self, pooled: Tensor | None, logits: Tensor) -> Tensor:
        """Halting probability (B,) from pooled features (B, F) and exit logits (B, C)."""
        ranked = logits.softmax(dim=1).sort(dim=1, descending=True).values  # (B, C)
        inputs = ranked if pooled is None else torch.cat([pooled, ranked], dim=1)  # (B, F + C)
        return torch.sigmoid(self.mlp(inputs)[:, 0])  # (B,)

    def forward(self, features: Tensor, logits: Tensor) -> Tensor:
        """Halting probability (B,) after a stage with output ``features`` and exit ``logits``."""
        return self.from_pooled(self.pool(features), logits)


def cumulative_halting(halting: Tensor) -> Tensor:
    """(B, L) halting probabilities -> (B, L) float64 cumulative ``1 - prod_{j<=l} (1 - h_j)``."""
    return 1.0 - torch.cumprod(1.0 - halting.double(), dim=1)


def halt_distribution(halting: Tensor) -> Tensor:
    """(B, L) halting probabilities (last = 1) -> (B, L) probability of halting exactly at l."""
    survive = torch.cumprod(1.0 - halting, dim=1)  # (B, L)
    before = torch.cat([torch.ones_like(survive[:, :1]), survive[:, :-1]], dim=1)  # (B, L)
    return halting * before


class HaltingNetwork(nn.Module):
    """An early-exit network with a halting unit after every stage but the last.

    Parameters
    ----------
    network : EarlyExitNetwork
        The trained network; its stages and heads are used as given.
    units : sequence of HaltingUnit, length L - 1
        Unit ``l`` reads stage ``l``'s output and exit ``l``'s logits.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from exitguard.nn import EarlyExitNetwork, HaltingNetwork
    >>> network = EarlyExitNetwork([nn.Linear(4, 8), nn.Linear(8, 8)], [nn.Linear(8, 3)] * 2)
    >>> halting = HaltingNetwork.attach(network, torch.randn(1, 4))
    >>> logits, halt = halting(torch.randn(5, 4))
    >>> logits.shape, halt.shape, bool((halt[:, -1] == 1).all())
    (torch.Size([5, 2, 3]), torch.Size([5, 2]), True)
    >>> halting.infer(torch.randn(5, 4), 0.0).exits.tolist()  # threshold 0: lambda = 1
    [0, 0, 0, 0, 0]
    """

    def __init__(self, network: EarlyExitNetwork, units: Sequence[HaltingUnit]) -> None:
        super().__init__()
        if not isinstance(network, EarlyExitNetwork):
            raise TypeError(f"`network` must be an EarlyExitNetwork; got {type(network).__name__}.")
        units = list(units)
        if len(units) != network.n_exits - 1:
            raise ValueError(
                "`units` must hold one halting unit per exit but the last "
                f"({network.n_exits - 1}); got {len(units)}."
            )
        for index, unit in enumerate(units):
            if not isinstance(unit, HaltingUnit):
                raise TypeError(
                    f"`units[{index}]` must be a HaltingUnit; got {type(unit).__name__}."
                )
        self.network = network
        self.units = nn.ModuleList(units)

    @classmethod
    def attach(
        cls,
        network: EarlyExitNetwork,
        example_input: Tensor,
        *,
        hidden: int = 32,
        read_features: bool = True,
    ) -> HaltingNetwork:
        """Fresh halting units for ``network``, sized on one sample of ``example_input``.

        ``read_features=False`` makes the units read the exit probabilities only.
        """
        with torch.no_grad():
            features = network.forward_intermediates(example_input[:1])
            logits = network(example_input[:1])  # (1, L, C)
        units = [
            HaltingUnit(
                int(f.shape[1]) if read_features and f.ndim >= 2 else None,
                int(logits.shape[2]),
                hidden=hidden,
            )
            for f in features[:-1]
        ]
        return cls(network, units)

    @property
    def n_exits(self) -> int:
        return self.network.n_exits

    @property
    def confidence(self) -> str:
        return MEASURE

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Every exit's logits (B, L, C) and halting probability (B, L) (the last is 1)."""
        self.network.check_input(x)
        logits, halting, h = [], [], x
        for index, head in enumerate(self.network.heads):
            h = self.network._run_stage(index, h)
            logits.append(head(h))  # (B, C)
            if index < self.n_exits - 1:
                halting.append(self.units[index](h, logits[-1]))  # (B,)
        halting.append(torch.ones_like(halting[0]) if halting else h.new_ones(x.shape[0]))
        return torch.stack(logits, dim=1), torch.stack(halting, dim=1)

    @torch.inference_mode()
    def exit_confidences(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Every exit's logits (B, L, C) and cumulative halting probability (B, L) float64."""
        logits, halting = self(x)
        return logits, cumulative_halting(halting)

    @torch.inference_mode()
    def infer(self, x: Tensor, threshold: float) -> InferenceResult:
        """Real early exit: a sample leaves once its cumulative halting probability >= threshold.

        ``threshold = 1 - lambda``; ``math.inf`` never exits early (no head or unit runs before
        the last exit). The result is in the order of ``x`` and its exits equal those of
        :meth:`simulate` (up to the last bits of a batch of another size, as for
        :meth:`EarlyExitNetwork.infer`). ``confidence`` is the cumulative halting probability
        at the exit taken.
        """
        limit = check_threshold(threshold, name="threshold")
        self.network.check_input(x)
        last = self.n_exits - 1
        never = math.isinf(limit)
        rows = torch.arange(x.shape[0], device=x.device)  # (A,) batch rows still running
        survive = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)  # (A,)
        writer = RowWriter(x.shape[0])
        h = x
        for index, head in enumerate(self.network.heads):
            h = self.network._run_stage(index, h)  # (A, ...)
            if never and index < last:
                continue  # nothing can stop early: skip the heads and units
            logits = head(h)  # (A, C)
            probs = logits.softmax(dim=1)
            if index == last:
                halt = torch.ones_like(survive)
            else:
                halt = self.units[index](h, logits).double()  # (A,)
            survive = survive * (1.0 - halt)  # the same products as cumulative_halting
            conf = 1.0 - survive  # (A,)
            stop = torch.ones_like(conf, dtype=torch.bool) if index == last else conf >= limit
            writer.leave(rows, stop, index, logits, probs, conf)
            if writer.complete:
                break
            keep = ~stop  # compact: only the samples still running go on
            rows, h, survive = rows[keep], h[keep], survive[keep]
        out = writer.result()
        return exit_result(out, limit, measure=MEASURE, n_exits=self.n_exits)

    @torch.inference_mode()
    def simulate(self, x: Tensor, threshold: float) -> InferenceResult:
        """The offline reference for :meth:`infer`: one full pass, then the exit rule."""
        limit = check_threshold(threshold, name="threshold")
        logits, conf = self.exit_confidences(x)  # (B, L, C), (B, L)
        return simulate_exit_rule(logits, conf, limit, measure=MEASURE)

    def count_flops(self, example_input: Tensor) -> FlopsTable:
        """FLOPs per stage, and per exit of the head plus the halting unit (the decision cost).

        ``to_exit[e]`` is then the cost of a sample that halts at exit ``e`` and ``full`` the
        backbone alone (no head or unit runs before the last exit under ``math.inf``).
        """
        base = count_flops(self.network, example_input)
        sample = example_input[:1]
        unit_flops = []
        with eval_mode(self), torch.no_grad():
            features = self.network.forward_intermediates(sample)
            for index, unit in enumerate(self.units):  # one count per exit
                logits = self.network.heads[index](features[index])
                unit_flops.append(_count(unit, features[index], logits)[0])
        decision = tuple(h + u for h, u in zip(base.head, [*unit_flops, 0], strict=True))
        return FlopsTable(
            stage=base.stage, head=decision, input_shape=base.input_shape, output=base.output
        )


# --------------------------------------------------------------------------- training

Target = Literal["labels", "full"]


@dataclasses.dataclass(frozen=True)
class HaltingTrainConfig:
    """How :func:`train_halting` trains the halting units (the network stays frozen).

    Attributes
    ----------
    epochs : int
    batch_size : int
    lr : float
        Adam learning rate.
    ponder_cost : float
        Weight of the expected compute ``sum_l p_l cost_l`` (costs in units of the full
        model, ACT's ponder cost); larger values halt earlier.
    prior : float in (0, 1)
        Halting probability per exit of PonderNet's geometric prior (truncated at the last
        exit).
    prior_weight : float
        Weight of ``KL(p || prior)``, which keeps the halting distribution spread out
        (PonderNet's regulariser) instead of a hard jump to one exit, so that thresholds on
        the cumulative halting probability give a fine family of policies.
    target : {"labels", "full"}
        The loss of each exit: cross-entropy against the labels, or against the last exit's
        prediction (label-free, matching the consistency risk).
    seed : int
        Seeds the shuffling (the units keep the initial weights they were built with).
    """

    epochs: int = 40
    batch_size: int = 128
    lr: float = 5e-3
    ponder_cost: float = 0.1
    prior: float = 0.3
    prior_weight: float = 0.1
    target: Target = "labels"
    seed: int = 0

    def __post_init__(self) -> None:
        _positive_int(self.epochs, "epochs")
        _positive_int(self.batch_size, "batch_size")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"`lr` must be a positive number; got {self.lr!r}.")
        if not (isinstance(self.ponder_cost, (int, float)) and self.ponder_cost >= 0):
            raise ValueError(f"`ponder_cost` must be a number >= 0; got {self.ponder_cost!r}.")
        if not (isinstance(self.prior, (int, float)) and 0 < self.prior < 1):
            raise ValueError(f"`prior` must be a number in (0, 1); got {self.prior!r}.")
        if not (isinstance(self.prior_weight, (int, float)) and self.prior_weight >= 0):
            raise ValueError(f"`prior_weight` must be a number >= 0; got {self.prior_weight!r}.")
        if self.target not in ("labels", "full"):
            raise ValueError(f"`target` must be 'labels' or 'full'; got {self.target!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"`seed` must be an integer >= 0; got {self.seed!r}.")


def geometric_prior(n_exits: int, prior: float) -> Tensor:
    """(L,) PonderNet's prior: halt with probability ``prior`` at each exit, the rest at the end."""
    exits = torch.arange(n_exits, dtype=torch.float32)
    p = prior * (1.0 - prior) ** exits  # (L,)
    p[-1] = (1.0 - prior) ** (n_exits - 1)  # the last exit halts everything left
    return p


def ponder_loss(
    halting: Tensor,
    exit_losses: Tensor,
    exit_cost: Tensor,
    *,
    ponder_cost: float,
    prior: Tensor | None = None,
    prior_weight: float = 0.0,
) -> Tensor:
    """Expected loss, ``ponder_cost`` x expected compute and ``prior_weight`` x KL to a prior.

    ``halting`` (B, L) with the last column 1, ``exit_losses`` (B, L), ``exit_cost`` (L,),
    ``prior`` (L,) (see :func:`geometric_prior`); averaged over the batch.
    """
    p = halt_distribution(halting)  # (B, L), rows sum to 1
    expected_loss = (p * exit_losses).sum(dim=1)  # (B,)
    expected_cost = (p * exit_cost[None, :]).sum(dim=1)  # (B,)
    total = expected_loss + ponder_cost * expected_cost
    if prior is not None and prior_weight > 0:
        kl = (torch.special.xlogy(p, p) - p * torch.log(prior[None, :])).sum(dim=1)  # (B,)
        total = total + prior_weight * kl
    return total.mean()


@torch.no_grad()
def _frozen_outputs(
    model: HaltingNetwork, data: Tensor, *, batch_size: int
) -> tuple[list[Tensor | None], Tensor]:
    """Pooled features per exit [(N, F_l)] and every exit's logits (N, L, C), in eval mode."""
    pooled: list[list[Tensor]] = [[] for _ in model.units]
    logits = []
    for start in range(0, data.shape[0], batch_size):
        features = model.network.forward_intermediates(data[start : start + batch_size])
        logits.append(
            torch.stack([head(f) for head, f in zip(model.network.heads, features, strict=True)], 1)
        )
        for index, unit in enumerate(model.units):  # one pooled tensor per exit
            value = unit.pool(features[index])
            if value is not None:
                pooled[index].append(value)
    return [torch.cat(p) if p else None for p in pooled], torch.cat(logits)


@dataclasses.dataclass(frozen=True)
class HaltingHistory:
    """Mean training objective per epoch of :func:`train_halting`."""

    config: HaltingTrainConfig
    loss: tuple[float, ...]
    mean_halting_exit: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.config),
            "loss": list(self.loss),
            "mean_halting_exit": self.mean_halting_exit,
        }


def train_halting(
    model: HaltingNetwork,
    data: Tensor,
    labels: Tensor | np.ndarray | None = None,
    *,
    config: HaltingTrainConfig | None = None,
    exit_cost: Sequence[float] | np.ndarray | None = None,
) -> HaltingHistory:
    """Train the halting units with a ponder cost; the network's stages and heads stay frozen.

    Parameters
    ----------
    model : HaltingNetwork
    data : Tensor (N, ...)
        Training inputs (not the calibration data).
    labels : int array (N,), optional
        Required for ``target="labels"``.
    config : HaltingTrainConfig, optional
    exit_cost : array (L,), optional
        Cost of halting at each exit, e.g. cumulative FLOPs; rescaled so the last exit costs
        1. Default: ``(l + 1) / L``.

    Returns
    -------
    HaltingHistory
    """
    config = config or HaltingTrainConfig()
    n_exits = model.n_exits
    if exit_cost is None:
        cost = torch.arange(1, n_exits + 1, dtype=torch.float32) / n_exits
    else:
        raw = np.asarray(exit_cost, dtype=np.float64)
        if raw.shape != (n_exits,) or not np.all(np.isfinite(raw)) or raw.min() < 0 or raw[-1] <= 0:
            raise ValueError(
                f"`exit_cost` must hold {n_exits} finite costs >= 0 with a positive last one; "
                f"got {raw.tolist()}."
            )
        cost = torch.as_tensor(raw / raw[-1], dtype=torch.float32)
    if config.target == "labels" and labels is None:
        raise ValueError("`labels` are required for target='labels' (or use target='full').")
    model.network.eval()  # frozen: its outputs are computed once, without gradients
    pooled, logits = _frozen_outputs(model, data, batch_size=512)  # [(N, F)], (N, L, C)
    if config.target == "labels":
        targets = torch.as_tensor(np.asarray(labels), dtype=torch.long)  # (N,)
        if targets.shape != (data.shape[0],):
            raise ValueError(
                f"`labels` must have shape ({data.shape[0]},); got {tuple(targets.shape)}."
            )
    else:
        targets = logits[:, -1].argmax(dim=1)
    exit_losses = F.cross_entropy(
        logits.transpose(1, 2), targets[:, None].expand(-1, n_exits), reduction="none"
    )  # (N, L)
    prior = geometric_prior(n_exits, config.prior)  # (L,)
    generator = torch.Generator().manual_seed(config.seed)
    optimiser = torch.optim.Adam(model.units.parameters(), lr=config.lr)
    model.units.train()
    history = []
    n = data.shape[0]
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for start in range(0, n, config.batch_size):
            index = order[start : start + config.batch_size]
            halting = [
                unit.from_pooled(None if p is None else p[index], logits[index, e])
                for e, (unit, p) in enumerate(zip(model.units, pooled, strict=True))
            ]  # (L - 1) x (b,): one unit per exit
            halting.append(torch.ones(len(index)))  # the last exit halts everything
            loss = ponder_loss(
                torch.stack(halting, dim=1),
                exit_losses[index],
                cost,
                ponder_cost=config.ponder_cost,
                prior=prior,
                prior_weight=config.prior_weight,
            )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(index)
        history.append(total / n)
    model.eval()
    with torch.no_grad():
        halting = [
            unit.from_pooled(p, logits[:, e])
            for e, (unit, p) in enumerate(zip(model.units, pooled, strict=True))
        ]
        halting.append(torch.ones(n))
        mean_exit = float(
            (halt_distribution(torch.stack(halting, 1)) * torch.arange(n_exits)).sum(1).mean()
        )
    return HaltingHistory(config=config, loss=tuple(history), mean_halting_exit=mean_exit)
