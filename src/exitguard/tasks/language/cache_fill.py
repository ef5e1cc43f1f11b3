"""How a token that leaves early fills the key/value cache of the layers it skipped.

A later token attends to every earlier token at every layer, so a token that exits after
layer ``l`` must still leave keys/values for layers ``l+1 ..``. Three strategies, one small
interface used by :meth:`EarlyExitLM.generate`'s decoding loop:

* :class:`Propagate` (CALM's state propagation): the exited hidden state stands for the
  deeper states; only its key/value projections are computed. Cheap, approximate.
* :class:`Recompute`: the token keeps climbing through every layer after its exit has been
  decided, so the cache is exact (as the full model's) and nothing is saved.
* :class:`Defer`: the token stops; its deeper layers are caught up later, only when (and as
  far as) a later token climbs past them, as extra items of that later token's layers. The
  same exact cache as ``Recompute``, computed lazily.

The loop asks a strategy four things: whether a token whose exit fired keeps climbing
(:attr:`CacheFill.keeps_climbing`), what to do when tokens exit (:meth:`CacheFill.exited`),
which earlier tokens join the work of a layer (:meth:`CacheFill.joining`), and to take note
of items that stopped (:meth:`CacheFill.stopped`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

KVCache = tuple[torch.Tensor, torch.Tensor]  # keys and values (L, B, K, T, D) of every layer


@dataclasses.dataclass(frozen=True)
class ExitedTokens:
    """New tokens whose exit fired after ``layer``, skipping the layers above it."""

    layer: int  # the last layer they ran
    rows: torch.Tensor  # (m,) their batch rows
    slot: int  # their cache slot
    states: torch.Tensor  # (m, H) hidden states after `layer`
    cos: torch.Tensor  # (m, 1, 1, D) rotary tables at their positions
    sin: torch.Tensor  # (m, 1, 1, D)


class CacheFill:
    """The interface (and the do-nothing parts shared by every strategy)."""

    name: ClassVar[str]
    keeps_climbing: ClassVar[bool] = False
    """A token whose exit fired keeps running deeper layers (to fill their cache exactly)."""

    def begin_step(self, rows: torch.Tensor, slot: int, positions: torch.Tensor) -> None:
        """A new token of every row in ``rows`` enters cache slot ``slot`` at ``positions``."""

    def joining(
        self, layer: int, rows: torch.Tensor, slot: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Earlier tokens of ``rows`` that must run ``layer`` now: (rows, slots, states, pos)."""
        return None

    def exited(self, lm: Any, tokens: ExitedTokens, cache: KVCache, cost: torch.Tensor) -> None:
        """New ``tokens`` left early: fill ``lm``'s ``cache`` for the layers they skipped, and
        add the compute to ``cost`` (B,), this step's per row."""

    def stopped(
        self, rows: torch.Tensor, slots: torch.Tensor, states: torch.Tensor | None, depth: int
    ) -> None:
        """Items of ``rows`` at ``slots`` stopped climbing with ``depth`` layers done."""


class Recompute(CacheFill):
    name = "recompute"
    keeps_climbing = True


class Propagate(CacheFill):
    name = "propagate"

    def exited(self, lm: Any, tokens: ExitedTokens, cache: KVCache, cost: torch.Tensor) -> None:
        # State propagation: the skipped layers' keys/values from the exited state.
        t = tokens
        lm._propagate(t.layer + 1, t.states, t.cos, t.sin, cache[0], cache[1], t.rows, t.slot)
        cost[t.rows] += lm.cost_propagate * (lm.n_layers - 1 - t.layer)


@dataclasses.dataclass
class Defer(CacheFill):
    """Tokens whose deeper layers were skipped, caught up when a later token needs them.

    ``depth[b, s]`` counts the layers whose keys/values exist for cache slot ``s`` of row
    ``b``; ``state[b, s]`` is that slot's hidden state after layer ``depth - 1``. Depth never
    grows along a row (a token can only have caught up as far as a later token climbed), so
    the slots missing layer ``l`` always form a run at the end of the row.
    """

    depth: torch.Tensor  # (B, T) long
    state: torch.Tensor  # (B, T, H)
    position: torch.Tensor  # (B, T) long
    n_layers: int
    count: int = 0  # slots with missing layers, all rows

    name: ClassVar[str] = "defer"

    @classmethod
    def allocate(
        cls, batch: int, total: int, width: int, n_layers: int, like: torch.Tensor
    ) -> Defer:
        depth = torch.full((batch, total), n_layers, dtype=torch.long, device=like.device)
        state = torch.zeros(batch, total, width, dtype=like.dtype, device=like.device)
        position = torch.zeros(batch, total, dtype=torch.long, device=like.device)
        return cls(depth=depth, state=state, position=position, n_layers=n_layers)

    def begin_step(self, rows: torch.Tensor, slot: int, positions: torch.Tensor) -> None:
        self.position[rows, slot] = positions

    def joining(
        self, layer: int, rows: torch.Tensor, slot: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        if not self.count or rows.numel() == 0:
            return None
        missing = self.depth[rows, :slot] == layer  # (n, slot)
        if not bool(missing.any()):
            return None
        which, slots = missing.nonzero(as_tuple=True)
        self.count -= int(which.numel())
        joined = rows[which]
        self.depth[joined, slots] = -1  # in flight
        return joined, slots, self.state[joined, slots], self.position[joined, slots]

    def stopped(
        self, rows: torch.Tensor, slots: torch.Tensor, states: torch.Tensor | None, depth: int
    ) -> None:
        if rows.numel() == 0:
            return
        self.depth[rows, slots] = depth
        if depth < self.n_layers and states is not None:
            self.state[rows, slots] = states
            self.count += int(rows.numel())


def make_cache_fill(
    name: str, *, batch: int, total: int, width: int, n_layers: int, like: torch.Tensor
) -> CacheFill:
    """The strategy called ``name`` for a generation of ``batch`` rows and ``total`` slots."""
    if name == "defer":
        return Defer.allocate(batch, total, width, n_layers, like)
    if name == "recompute":
        return Recompute()
    if name == "propagate":
        return Propagate()
    raise ValueError(f"`kv_fill` must be one of 'propagate', 'recompute', 'defer'; got {name!r}.")
