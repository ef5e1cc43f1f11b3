"""Layer skipping (SkipNet-style): per-sample gates decide which residual blocks run.

A :class:`SkipNetwork` is a stem, a sequence of blocks and a head. Each block may carry a
:class:`SkipGate` that reads the block's input and gives a score in (0, 1); under a threshold
``t`` a gated block runs for a sample when its score is >= ``t``, and a skipped block passes its
input on unchanged (the identity path of the residual connection). Blocks without a gate (e.g.
those that change the resolution) always run.

``t = 0`` runs every block (the full model; the gates are not even evaluated) and larger
thresholds skip more, so the thresholds ``0 = t_0 < t_1 < ...`` order the configurations from
the full model. The risk need not be monotone along them (a block's decision changes the input
of every later gate), so the loss table is certified with fixed-sequence testing (UCB or LTT),
never with a procedure that assumes monotonicity. Its table comes from one pass per threshold
(:func:`exitguard.tasks.mechanisms.sweep.skipping_table`).

Real skipping (:meth:`SkipNetwork.infer`): each gated block runs only on the samples that take
it and its outputs are scattered back in batch order; :meth:`SkipNetwork.simulate` runs every
block on every sample and selects, and both give the same decisions and outputs.

Gates are trained with the network (:func:`train_skipping`): a hard 0/1 decision in the forward
pass with the gradient of a relaxed (Gumbel-sigmoid) decision (straight-through), and a compute
penalty on the expected FLOPs of the gated blocks (Wang et al., "SkipNet: Learning Dynamic
Routing in Convolutional Networks", ECCV 2018; Veit and Belongie, "Convolutional Networks with
Adaptive Inference Graphs", ECCV 2018).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike, NDArray
from torch import Tensor, nn

from exitguard.nn._compaction import check_batch
from exitguard.nn._modes import eval_mode
from exitguard.nn.flops import _count


class SkipGate(nn.Module):
    """The score of running a block for each sample: average over positions, linear, sigmoid.

    ``logit(h)`` reads the block's input (B, C, *S) (or (B, C)); ``forward`` gives the score
    ``sigmoid(logit)`` in (0, 1), (B,). The bias starts at ``initial_logit`` so that a new
    gate runs its block (``sigmoid(2) = 0.88``).
    """

    def __init__(self, channels: int, *, initial_logit: float = 2.0) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"`channels` must be a positive integer; got {channels!r}.")
        self.fc = nn.Linear(channels, 1)
        with torch.no_grad():
            self.fc.bias.fill_(float(initial_logit))

    def logit(self, h: Tensor) -> Tensor:
        pooled = h.flatten(2).mean(dim=2) if h.ndim > 2 else h  # (B, C)
        return self.fc(pooled)[:, 0]  # (B,)

    def forward(self, h: Tensor) -> Tensor:
        return torch.sigmoid(self.logit(h))  # (B,)


def check_skip_threshold(value: Any, *, name: str = "threshold") -> float:
    """A skip threshold: a number in [0, 1] (0 runs every block)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number in [0, 1] (0 runs every block); got {value!r}.")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(
            f"`{name}` must be a number in [0, 1] (0 runs every block); got {value!r}."
        )
    return float(value)


@dataclasses.dataclass(frozen=True, repr=False)
class SkipResult:
    """Outcome of :meth:`SkipNetwork.infer` (or ``simulate``) for a batch.

    Attributes
    ----------
    predictions : Tensor (B,) int64
    probs, logits : Tensor (B, C)
    ran : Tensor (B, G) bool
        Whether each gated block ran for each sample (G = number of gated blocks).
    threshold : float
    """

    predictions: Tensor
    probs: Tensor
    logits: Tensor
    ran: Tensor
    threshold: float

    def __repr__(self) -> str:
        share = float(self.ran.double().mean()) if self.ran.numel() else 1.0
        return (
            f"SkipResult(batch={self.predictions.shape[0]}, gated blocks run={share:.3f}, "
            f"threshold={self.threshold:g})"
        )


@dataclasses.dataclass(frozen=True)
class SkipFlops:
    """FLOPs of one sample through the stem, each block, each gate and the head.

    Attributes
    ----------
    stem, head : int
    block : tuple of int, length N
    gate : tuple of int, length N (0 for blocks without a gate)
    gated : tuple of bool, length N
    """

    stem: int
    block: tuple[int, ...]
    gate: tuple[int, ...]
    head: int
    gated: tuple[bool, ...]

    @property
    def full(self) -> int:
        """Every block, no gate (the threshold 0)."""
        return int(self.stem + sum(self.block) + self.head)

    def cost(self, ran: ArrayLike, *, gates_run: bool = True) -> NDArray[np.float64]:
        """FLOPs per sample from ``ran`` (..., G), which gated blocks ran.

        ``gates_run=False`` for the threshold 0, where no gate is evaluated.
        """
        taken = np.asarray(ran, dtype=np.float64)  # (..., G)
        gated = np.asarray(self.gated)
        block = np.asarray(self.block, dtype=np.float64)
        if taken.shape[-1:] != (int(gated.sum()),):
            raise ValueError(
                f"`ran` must have {int(gated.sum())} entries (one per gated block) on its last "
                f"axis; got shape {taken.shape}."
            )
        fixed = self.stem + self.head + float(block[~gated].sum())
        gates = float(sum(self.gate)) if gates_run else 0.0
        return fixed + gates + taken @ block[gated]

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "full": self.full}


class SkipNetwork(nn.Module):
    """A stem, residual blocks that per-sample gates may skip, and a head.

    Parameters
    ----------
    stem : nn.Module
        (B, ...) -> features.
    blocks : sequence of nn.Module
        Each maps features to features; a gated block must keep their shape.
    gates : sequence of SkipGate or None
        One per block; None for a block that always runs.
    head : nn.Module
        Features -> logits (B, C).
    input_shape : tuple of int or None, optional
        Per-sample input shape checked on every call.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> blocks = [nn.Linear(8, 8), nn.Linear(8, 8)]
    >>> network = SkipNetwork(nn.Linear(4, 8), blocks, [SkipGate(8), None], nn.Linear(8, 3))
    >>> network.infer(torch.randn(5, 4), 0.0).ran.all().item()  # threshold 0: every block
    True
    >>> network.infer(torch.randn(5, 4), 1.0).ran.any().item()  # no score reaches 1
    False
    """

    def __init__(
        self,
        stem: nn.Module,
        blocks: Sequence[nn.Module],
        gates: Sequence[SkipGate | None],
        head: nn.Module,
        *,
        input_shape: Sequence[int | None] | None = None,
    ) -> None:
        super().__init__()
        blocks, gates = list(blocks), list(gates)
        if len(gates) != len(blocks):
            raise ValueError(
                f"`gates` must hold one entry (a SkipGate or None) per block ({len(blocks)}); "
                f"got {len(gates)}."
            )
        for index, gate in enumerate(gates):
            if gate is not None and not isinstance(gate, SkipGate):
                raise TypeError(
                    f"`gates[{index}]` must be a SkipGate or None; got {type(gate).__name__}."
                )
        if not any(g is not None for g in gates):
            raise ValueError("`gates` must hold at least one SkipGate; got none.")
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.gates = nn.ModuleList([g if g is not None else nn.Identity() for g in gates])
        self.gated = tuple(g is not None for g in gates)
        self.head = head
        self.input_shape = None if input_shape is None else tuple(input_shape)

    @property
    def n_gated(self) -> int:
        return sum(self.gated)

    def extra_repr(self) -> str:
        return f"blocks={len(self.blocks)}, gated={self.n_gated}"

    def _run_block(self, index: int, h: Tensor) -> Tensor:
        out = self.blocks[index](h)
        if self.gated[index] and out.shape != h.shape:
            raise ValueError(
                f"gated block {index} must keep the shape of its input {tuple(h.shape)} (a "
                f"skipped block passes it on); got {tuple(out.shape)}."
            )
        return out

    def forward(self, x: Tensor) -> Tensor:
        """The full model: every block on every sample; (B, ...) -> logits (B, C)."""
        check_batch(x, self.input_shape)
        h = self.stem(x)
        for index in range(len(self.blocks)):
            h = self._run_block(index, h)
        return self.head(h)

    def _output(self, logits: Tensor, ran: list[Tensor], threshold: float, n: int) -> SkipResult:
        probs = logits.softmax(dim=1)
        mask = torch.stack(ran, dim=1) if ran else torch.ones((n, 0), dtype=torch.bool)
        return SkipResult(
            predictions=probs.max(dim=1).indices,
            probs=probs,
            logits=logits,
            ran=mask,
            threshold=threshold,
        )

    @torch.inference_mode()
    def infer(self, x: Tensor, threshold: float) -> SkipResult:
        """Real layer skipping: each gated block runs only on the samples that take it.

        A sample takes a gated block when its gate score (on the block's input) is >=
        ``threshold``; the block runs on those samples alone and its outputs are written back
        at their rows, the others keep their features. ``threshold = 0`` runs every block
        without evaluating a gate. Equal to :meth:`simulate` (up to the last bits of a
        convolution on a batch of another size).
        """
        return self._gated_pass(x, threshold, real=True)

    @torch.inference_mode()
    def simulate(self, x: Tensor, threshold: float) -> SkipResult:
        """The offline reference for :meth:`infer`: every block on every sample, then selection."""
        return self._gated_pass(x, threshold, real=False)

    def _gated_pass(self, x: Tensor, threshold: float, *, real: bool) -> SkipResult:
        """One pass under ``threshold``: gated blocks really skipped (``real``) or masked."""
        limit = check_skip_threshold(threshold)
        check_batch(x, self.input_shape)
        n = x.shape[0]
        h = self.stem(x)
        ran: list[Tensor] = []
        for index in range(len(self.blocks)):  # blocks run in sequence
            if not self.gated[index]:
                h = self._run_block(index, h)
                continue
            if limit == 0.0:  # every block runs: no gate is evaluated
                take = torch.ones(n, dtype=torch.bool, device=x.device)  # (B,)
                h = self._run_block(index, h)
            else:
                take = self.gates[index](h) >= limit  # (B,)
                if real:
                    h = self._run_taken(index, h, take, x)
                else:  # every sample runs the block, then selection
                    out = self._run_block(index, h)
                    h = torch.where(take.view(-1, *([1] * (h.ndim - 1))), out, h)
            ran.append(take)
        return self._output(self.head(h), ran, limit, n)

    def _run_taken(self, index: int, h: Tensor, take: Tensor, x: Tensor) -> Tensor:
        """Gated block ``index`` on the samples ``take`` (B,) alone, scattered back into ``h``."""
        rows = take.nonzero()[:, 0]  # (T,) the samples that run this block
        if rows.shape[0] == h.shape[0]:
            return self._run_block(index, h)
        if rows.shape[0] > 0:
            out = self._run_block(index, h[rows])  # (T, ...) only those samples
            if h.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
                h = h.clone()  # never write into the caller's tensor
            h[rows] = out  # scatter back in batch order
        return h

    def forward_train(
        self, x: Tensor, *, temperature: float, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """The gated model for training: logits (B, C) and keep probabilities (B, G).

        Each gate's decision is hard (0/1) in the forward pass and carries the gradient of a
        Gumbel-sigmoid relaxation at ``temperature`` (straight-through). Every block runs on
        every sample (masked), so this costs the full model.
        """
        h = self.stem(x)
        keep = []
        for index in range(len(self.blocks)):  # blocks run in sequence
            out = self._run_block(index, h)
            if not self.gated[index]:
                h = out
                continue
            logit = self.gates[index].logit(h)  # (B,)
            keep.append(torch.sigmoid(logit))
            u = torch.rand(logit.shape, generator=generator, device=logit.device)
            u = u.clamp(1e-6, 1 - 1e-6)
            soft = torch.sigmoid((logit + torch.log(u) - torch.log1p(-u)) / temperature)
            decision = (soft >= 0.5).to(soft.dtype) + soft - soft.detach()  # (B,) hard, ST grad
            mask = decision.view(-1, *([1] * (h.ndim - 1)))
            h = mask * out + (1 - mask) * h
        return self.head(h), torch.stack(keep, dim=1)

    @torch.inference_mode()
    def gate_scores(self, x: Tensor) -> Tensor:
        """Every gate's score on the full model's path (every block run); (B, G)."""
        check_batch(x, self.input_shape)
        h = self.stem(x)
        scores = []
        for index in range(len(self.blocks)):  # blocks run in sequence
            if self.gated[index]:
                scores.append(self.gates[index](h))
            h = self._run_block(index, h)
        return torch.stack(scores, dim=1)

    def count_flops(self, example_input: Tensor) -> SkipFlops:
        """FLOPs of the first sample of ``example_input`` through every part (torch's counter)."""
        check_batch(example_input, self.input_shape)
        with eval_mode(self), torch.no_grad():
            stem, h = _count(self.stem, example_input[:1])
            block, gate = [], []
            for index in range(len(self.blocks)):  # one count per block and gate
                gate.append(_count(self.gates[index], h)[0] if self.gated[index] else 0)
                flops, h = _count(self.blocks[index], h)
                block.append(flops)
            head, _ = _count(self.head, h)
        return SkipFlops(
            stem=stem, block=tuple(block), gate=tuple(gate), head=head, gated=self.gated
        )


# --------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class SkipTrainConfig:
    """How :func:`train_skipping` trains a skip network and its gates together.

    Attributes
    ----------
    epochs : int
        Epochs in all; the first ``warmup_epochs`` train the full model only (every block).
    warmup_epochs : int
    batch_size : int
    lr, weight_decay : float
        AdamW settings.
    compute_weight : float
        Weight of the compute penalty: the expected share of the gated blocks' FLOPs run.
    temperature : float
        Temperature of the Gumbel-sigmoid relaxation.
    distill : float
        Weight of distilling the full model's output into the gated one (KL divergence).
    seed : int
        Seeds shuffling and the Gumbel noise.
    """

    epochs: int = 12
    warmup_epochs: int = 4
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    compute_weight: float = 0.5
    temperature: float = 1.0
    distill: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")
        if not (isinstance(self.warmup_epochs, int) and 0 <= self.warmup_epochs < self.epochs):
            raise ValueError(
                f"`warmup_epochs` must be an integer in [0, epochs - 1] = [0, {self.epochs - 1}] "
                f"(the rest trains the gates); got {self.warmup_epochs!r}."
            )
        for name, low_open in (
            ("lr", True),
            ("weight_decay", False),
            ("compute_weight", False),
            ("temperature", True),
            ("distill", False),
        ):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
            if not ok or (low_open and value == 0) or not math.isfinite(value):
                bound = "> 0" if low_open else ">= 0"
                raise ValueError(f"`{name}` must be a finite number {bound}; got {value!r}.")


@dataclasses.dataclass(frozen=True)
class SkipHistory:
    """Mean objective and mean keep probability of the gated blocks, per epoch."""

    config: SkipTrainConfig
    loss: tuple[float, ...]
    keep: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.config),
            "loss": list(self.loss),
            "keep": list(self.keep),
        }


def train_skipping(
    network: SkipNetwork,
    images: Tensor,
    labels: Tensor,
    *,
    config: SkipTrainConfig | None = None,
    flops: SkipFlops | None = None,
) -> SkipHistory:
    """Train a skip network: the full model, and the gated model with a compute penalty.

    After ``warmup_epochs`` of the full model alone, every batch trains both the full model
    (cross-entropy) and the gated model (cross-entropy, distillation from the full model, and
    ``compute_weight`` times the expected share of gated FLOPs), so that the full model stays
    good (it is the reference of the risk) while the gates learn what to skip.

    Parameters
    ----------
    network : SkipNetwork
    images : Tensor (N, ...)
    labels : int Tensor (N,)
    config : SkipTrainConfig, optional
    flops : SkipFlops, optional
        Weights of the gated blocks in the penalty (their FLOPs); counted when not given.
    """
    config = config or SkipTrainConfig()
    if labels.shape != (images.shape[0],):
        raise ValueError(
            f"`labels` must have shape ({images.shape[0]},); got {tuple(labels.shape)}."
        )
    counted = flops or network.count_flops(images[:1])
    weights = torch.as_tensor(
        [f for f, g in zip(counted.block, counted.gated, strict=True) if g], dtype=torch.float32
    )
    weights = weights / weights.sum()  # (G,) share of the gated FLOPs
    generator = torch.Generator().manual_seed(config.seed)
    optimiser = torch.optim.AdamW(
        network.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    n = images.shape[0]
    steps = config.epochs * math.ceil(n / config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=config.lr, total_steps=steps)
    losses, keeps = [], []
    network.train()
    for epoch in range(config.epochs):
        order = torch.randperm(n, generator=generator)
        total = keep_total = 0.0
        for start in range(0, n, config.batch_size):
            index = order[start : start + config.batch_size]
            x, y = images[index], labels[index]
            full = network(x)  # (b, C)
            loss = F.cross_entropy(full, y)
            if epoch >= config.warmup_epochs:
                gated, keep = network.forward_train(
                    x, temperature=config.temperature, generator=generator
                )  # (b, C), (b, G)
                teacher = full.detach().log_softmax(dim=1)
                loss = (
                    loss
                    + F.cross_entropy(gated, y)
                    + config.distill
                    * F.kl_div(
                        gated.log_softmax(dim=1), teacher, log_target=True, reduction="batchmean"
                    )
                    + config.compute_weight * (keep * weights).sum(dim=1).mean()
                )
                keep_total += float(keep.detach().mean()) * len(index)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach()) * len(index)
        losses.append(total / n)
        keeps.append(keep_total / n if epoch >= config.warmup_epochs else 1.0)
    network.eval()
    return SkipHistory(config=config, loss=tuple(losses), keep=tuple(keeps))
