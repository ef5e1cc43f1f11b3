"""Cascades: separately trained models of growing cost, each run only where needed.

A sample goes to model ``m + 1`` only when model ``m`` is not confident enough; the last model
is the reference (the full model) and answers whatever reaches it. The rule is the exit rule
of :mod:`exitguard.risk.exits` with "exit" read as "model": a sample stops at the first model
whose confidence is >= the threshold, else at the last model; ``math.inf`` runs the last model
alone. So a cascade's loss and cost tables are built and certified exactly like a branch-exit
network's, and its risk is measured against the last model.

Unlike the exits of one network, the models share no computation: stopping at model ``m``
costs models ``0..m`` together (:class:`CascadeFlops`), and a sample that goes all the way
costs more than the last model alone. A cascade saves compute only when most samples stop
early.

    cascade = Cascade([small, medium, large])          # any modules (B, ...) -> logits (B, C)
    logits = cascade(x)                                 # (B, M, C): every model, for tables
    result = cascade.infer(x, 0.9)                      # real: model m+1 sees only the rest
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from torch import Tensor, nn

from exitguard.nn._compaction import RowWriter, check_batch
from exitguard.nn._mechanism import exit_result, simulate_exit_rule
from exitguard.nn._modes import eval_mode
from exitguard.nn.confidence import ConfidenceFn, is_pointwise, resolve_measure
from exitguard.nn.flops import _count, exit_cost_table
from exitguard.nn.network import InferenceResult
from exitguard.risk.exits import check_threshold


@dataclasses.dataclass(frozen=True)
class CascadeFlops:
    """FLOPs of one sample through each model of a cascade.

    Attributes
    ----------
    model : tuple of int, length M
        FLOPs of model ``m`` on one sample.
    input_shape : tuple of int
    """

    model: tuple[int, ...]
    input_shape: tuple[int, ...]

    @property
    def n_exits(self) -> int:
        return len(self.model)

    @property
    def to_exit(self) -> NDArray[np.int64]:
        """(M,) cost of a sample that stops at model ``m``: models ``0..m``."""
        return np.cumsum(self.model, dtype=np.int64)

    @property
    def full(self) -> int:
        """Cost of the never-exit policy (``math.inf``): the last model alone."""
        return int(self.model[-1])

    def cost_table(
        self, exits: ArrayLike, *, thresholds: ArrayLike | None = None
    ) -> NDArray[np.float64]:
        """FLOPs of every sample under every row for exits (K, n); ``inf`` rows cost ``full``."""
        return exit_cost_table(self.to_exit, exits, full=self.full, thresholds=thresholds)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": list(self.model),
            "input_shape": list(self.input_shape),
            "to_exit": self.to_exit.tolist(),
            "full": self.full,
        }


class Cascade(nn.Module):
    """Models of growing cost; the next one runs only on the samples not yet confident.

    Parameters
    ----------
    models : sequence of nn.Module, length M >= 2
        Each maps the same input (B, ...) to logits (B, C) over the same classes; ordered from
        the cheapest to the reference model (the last), which defines the full model. The
        modules are used as given, not copied.
    confidence : {"max_softmax", "margin", "entropy"} or callable
        A pointwise confidence measure (see :mod:`exitguard.nn.confidence`) applied to each
        model's softmax.
    input_shape : tuple of int or None, optional
        Per-sample input shape checked on every call (``None`` entries accept any size).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> cascade = Cascade([nn.Linear(4, 3), nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))])
    >>> cascade(torch.randn(5, 4)).shape
    torch.Size([5, 2, 3])
    >>> cascade.infer(torch.randn(5, 4), 0.0).exits.tolist()
    [0, 0, 0, 0, 0]
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        *,
        confidence: str | ConfidenceFn = "max_softmax",
        input_shape: Sequence[int | None] | None = None,
    ) -> None:
        super().__init__()
        models = list(models)
        if len(models) < 2:
            raise ValueError(
                f"`models` must hold at least 2 modules (a cheap one and the reference); got "
                f"{len(models)}."
            )
        for index, model in enumerate(models):
            if not isinstance(model, nn.Module):
                raise TypeError(
                    f"`models[{index}]` must be an nn.Module; got {type(model).__name__}."
                )
        self.models = nn.ModuleList(models)
        self.confidence_name, self._confidence_fn = resolve_measure(confidence)
        if not is_pointwise(self._confidence_fn):
            raise ValueError(
                "`confidence` must be a pointwise measure (its value for a model depends on "
                f"that model's output alone), e.g. 'max_softmax'; got {self.confidence_name!r}."
            )
        self.input_shape = None if input_shape is None else tuple(input_shape)

    @property
    def n_exits(self) -> int:
        """Number of models M (the last one is the full model)."""
        return len(self.models)

    def extra_repr(self) -> str:
        return f"n_models={self.n_exits}, confidence={self.confidence_name!r}"

    def _logits(self, index: int, x: Tensor) -> Tensor:
        out = self.models[index](x)
        if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"model {index} must return logits (B, C) for B = {x.shape[0]}; got {shape}."
            )
        return out

    def _confidence(self, probs: Tensor) -> Tensor:
        """(A, C) probabilities -> (A,) float64 confidences in [0, 1]."""
        return self._confidence_fn(probs.double()[:, None])[:, 0].clamp(0.0, 1.0)

    def forward(self, x: Tensor) -> Tensor:
        """Every model's logits on every sample: (B, ...) -> (B, M, C)."""
        check_batch(x, self.input_shape)
        outputs = [self._logits(index, x) for index in range(self.n_exits)]  # M x (B, C)
        if len({tuple(o.shape) for o in outputs}) > 1:
            listed = ", ".join(str(tuple(o.shape)) for o in outputs)
            raise ValueError(f"every model must give logits of the same shape; got {listed}.")
        return torch.stack(outputs, dim=1)  # (B, M, C)

    @torch.inference_mode()
    def exit_confidences(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Every model's logits (B, M, C) and confidences (B, M) float64, from one full pass."""
        logits = self(x)  # (B, M, C)
        probs = logits.softmax(dim=2)  # (B, M, C)
        conf = self._confidence_fn(probs.double()).clamp(0.0, 1.0)  # (B, M)
        return logits, conf

    @torch.inference_mode()
    def infer(self, x: Tensor, threshold: float) -> InferenceResult:
        """Cascade inference that runs model ``m + 1`` only on the samples model ``m`` passes on.

        After each model, the samples whose confidence is >= ``threshold`` are written out and
        removed from the batch; the others go to the next model. ``math.inf`` runs the last
        model alone. The result is in the order of ``x``; its ``exits`` are model indices and
        equal those of :meth:`simulate`.

        As for :meth:`EarlyExitNetwork.infer`, a sample's outputs can differ in the last bits
        when it runs in a batch of another size, so a confidence within about 1e-7 of the
        threshold may stop differently than in :meth:`simulate`.
        """
        limit = check_threshold(threshold, name="threshold")
        check_batch(x, self.input_shape)
        last = self.n_exits - 1
        rows = torch.arange(x.shape[0], device=x.device)  # (A,) batch rows still running
        writer = RowWriter(x.shape[0])
        active = x
        for index in range(self.n_exits):
            if math.isinf(limit) and index < last:
                continue  # nothing can stop early: only the reference model runs
            logits = self._logits(index, active)  # (A, C)
            probs = logits.softmax(dim=1)  # (A, C)
            conf = self._confidence(probs)  # (A,)
            stop = torch.ones_like(conf, dtype=torch.bool) if index == last else conf >= limit
            writer.leave(rows, stop, index, logits, probs, conf)
            if writer.complete:
                break
            keep = ~stop  # compact: only the samples not yet confident go on
            rows, active = rows[keep], active[keep]
        out = writer.result()
        return exit_result(out, limit, measure=self.confidence_name, n_exits=self.n_exits)

    @torch.inference_mode()
    def simulate(self, x: Tensor, threshold: float) -> InferenceResult:
        """The offline reference for :meth:`infer`: every model on every sample, then the rule."""
        limit = check_threshold(threshold, name="threshold")
        logits, conf = self.exit_confidences(x)  # (B, M, C), (B, M)
        return simulate_exit_rule(logits, conf, limit, measure=self.confidence_name)

    def count_flops(self, example_input: Tensor) -> CascadeFlops:
        """FLOPs of the first sample of ``example_input`` through every model (torch's counter)."""
        check_batch(example_input, self.input_shape)
        sample = example_input[:1]
        with eval_mode(self), torch.no_grad():
            # A few models: one count each.
            counts = [_count(self._logits, index, sample)[0] for index in range(self.n_exits)]
        return CascadeFlops(model=tuple(counts), input_shape=tuple(sample.shape[1:]))
