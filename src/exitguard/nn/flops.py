"""Compute accounting: FLOPs per stage and per exit head, and per-sample cost tables.

FLOPs are counted with :mod:`torch.utils.flop_counter` on one sample (they grow linearly
with the batch): matrix products, convolutions and attention, 2 FLOPs per multiply-add.
Element-wise work (normalisation, activations, softmax) is not counted.

Cost of a sample that leaves at exit ``e``: the stages ``0..e`` plus every head evaluated on
the way, ``0..e``, since the decision at each exit needs its head. Under the never-exit
policy no intermediate head runs, so the full model costs the backbone alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from exitguard.nn._modes import eval_mode
from exitguard.nn.network import EarlyExitNetwork
from exitguard.risk._validation import check_indices


def _cpu_attention_flops(
    query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any
) -> int:
    return int(sdpa_flop_count(query_shape, key_shape, value_shape))


# The CPU kernel of scaled_dot_product_attention is missing from torch's FLOP registry.
_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


@contextlib.contextmanager
def flop_counter() -> Iterator[FlopCounterMode]:
    """``torch.utils.flop_counter.FlopCounterMode`` that sees everything this module counts.

    It adds the CPU kernel of ``scaled_dot_product_attention`` (missing from torch's table)
    and turns off the fused fast path of ``nn.MultiheadAttention`` / transformer layers,
    which the counter cannot see, for the duration.

    Examples
    --------
    >>> import torch
    >>> with flop_counter() as counter:
    ...     _ = torch.nn.Linear(4, 3)(torch.ones(2, 4))
    >>> counter.get_total_flops()
    48
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
            yield counter
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _count(fn: Any, *args: Any) -> tuple[int, Any]:
    with flop_counter() as counter:
        out = fn(*args)
    return int(counter.get_total_flops()), out


def exit_cost_table(
    to_exit: ArrayLike, exits: ArrayLike, *, full: float, thresholds: ArrayLike | None = None
) -> NDArray[np.float64]:
    """``cost[k, i] = to_exit[exits[k, i]]`` for exits (K, n), rows whose threshold is ``inf``
    (never exit: no intermediate exit runs) costing ``full``; float (K, n)."""
    per_exit = np.asarray(to_exit)
    taken = check_indices(exits, "exits", size=len(per_exit), of="exit")
    table = per_exit[taken].astype(np.float64)
    if table.ndim != 2:
        raise ValueError(f"`exits` must be 2-D (K, n); got shape {table.shape}.")
    if thresholds is not None:
        grid = np.asarray(thresholds, dtype=np.float64)
        if grid.shape != (table.shape[0],):
            raise ValueError(
                f"`thresholds` must have shape ({table.shape[0]},) to match `exits`; "
                f"got {grid.shape}."
            )
        table[np.isposinf(grid)] = full
    return table


@dataclasses.dataclass(frozen=True)
class FlopsTable:
    """FLOPs of one sample through each stage and each exit head.

    Attributes
    ----------
    stage : tuple of int, length L
        FLOPs of stage ``l`` (the last stage includes the backbone's head when it is part
        of it).
    head : tuple of int, length L
        FLOPs of exit head ``l`` (0 for an identity last head).
    input_shape : tuple of int
        The per-sample input shape they were counted on.
    output : int
        FLOPs of the network's ``resize`` (a dense network deciding at low resolution),
        paid once by every sample at whatever exit it leaves; 0 without one.
    """

    stage: tuple[int, ...]
    head: tuple[int, ...]
    input_shape: tuple[int, ...]
    output: int = 0

    @property
    def n_exits(self) -> int:
        return len(self.stage)

    @property
    def to_exit(self) -> NDArray[np.int64]:
        """(L,) cost of a sample that leaves at each exit: stages and heads ``0..e``, and
        its output."""
        cumulative = np.cumsum(self.stage, dtype=np.int64) + np.cumsum(self.head, dtype=np.int64)
        return cumulative + self.output

    @property
    def full(self) -> int:
        """Cost of the never-exit policy: every stage, the last head only, the output."""
        return int(sum(self.stage) + self.head[-1] + self.output)

    def cost(self, exits: ArrayLike) -> NDArray[np.int64]:
        """FLOPs of each sample given its exit; same shape as ``exits``."""
        return self.to_exit[check_indices(exits, "exits", size=self.n_exits, of="exit")]

    def cost_table(
        self, exits: ArrayLike, *, thresholds: ArrayLike | None = None
    ) -> NDArray[np.float64]:
        """Per-sample cost table for the risk core: ``cost[k, i]`` in FLOPs.

        Parameters
        ----------
        exits : int array of shape (K, n)
            Exit of sample ``i`` under candidate policy ``k``, e.g. from
            :func:`exitguard.risk.exits.exit_indices`.
        thresholds : array of shape (K,), optional
            The candidates' thresholds. Rows whose threshold is ``inf`` (never exit) are
            costed as the backbone alone (no intermediate heads run), as in ``infer``.

        Returns
        -------
        float array of shape (K, n)
        """
        return exit_cost_table(self.to_exit, exits, full=self.full, thresholds=thresholds)

    def expected(self, exits: ArrayLike, *, threshold: float | None = None) -> float:
        """Mean FLOPs per sample of a policy, given the exits it takes on some data.

        With ``threshold=math.inf`` this is :attr:`full`.
        """
        if threshold is not None and math.isinf(threshold):
            return float(self.full)
        return float(np.mean(self.cost(exits)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": list(self.stage),
            "head": list(self.head),
            "input_shape": list(self.input_shape),
            "output": self.output,
            "to_exit": self.to_exit.tolist(),
            "full": self.full,
        }


def count_flops(network: EarlyExitNetwork, example_input: Tensor | None = None) -> FlopsTable:
    """Count the FLOPs of one sample through every stage and exit head.

    Parameters
    ----------
    network : EarlyExitNetwork
    example_input : Tensor of shape (B, ...), optional
        Its first sample is used. By default a random sample of ``network.input_shape``.

    Returns
    -------
    FlopsTable
    """
    if not isinstance(network, EarlyExitNetwork):
        raise TypeError(f"`network` must be an EarlyExitNetwork; got {type(network).__name__}.")
    if example_input is None:
        shape = network.input_shape
        if shape is None or any(d is None for d in shape):
            raise ValueError(
                "`example_input` is needed: the network's `input_shape` is "
                f"{shape!r}, not a complete shape."
            )
        reference = next(iter(network.parameters()), None)
        generator = torch.Generator().manual_seed(0)
        example_input = torch.randn((1, *shape), generator=generator)  # type: ignore[arg-type]
        if reference is not None:
            example_input = example_input.to(device=reference.device, dtype=reference.dtype)
    network.check_input(example_input)
    sample = example_input[:1]
    stage_flops, head_flops = [], []
    output = 0
    with eval_mode(network), torch.no_grad():
        h = sample
        for index, head in enumerate(network.heads):
            flops, h = _count(network.stages[index], h)
            stage_flops.append(flops)
            flops, logits = _count(head, h)
            head_flops.append(flops)
        if network.resize is not None:
            output, _ = _count(network.resize, logits)
    return FlopsTable(
        stage=tuple(stage_flops),
        head=tuple(head_flops),
        input_shape=tuple(sample.shape[1:]),
        output=output,
    )
