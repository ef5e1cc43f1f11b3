"""Outputs of a batch whose samples finish at different steps, written back in batch order.

Real early exit removes the samples that have finished from the running batch (compaction);
their outputs are written at their original rows here, so a mechanism's result is in the order
of its input whatever order the samples finished in. Shared by the cascade, learned halting and
anytime (per-sample budget) runners.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor


class RowWriter:
    """Per-sample outputs of a batch of ``n`` samples that finish in pieces.

    ``write(rows, values)`` stores ``values[name][j]`` at row ``rows[j]`` of the output
    ``name``; buffers are allocated on the first write, with the shapes and dtypes of the
    values. When the first write covers the whole batch (always so at batch 1) the values are
    kept as they are, without a copy.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.written = 0
        self._buffers: dict[str, Tensor] = {}

    def write(self, rows: Tensor, values: Mapping[str, Tensor]) -> None:
        count = int(rows.shape[0])
        if count == 0:
            return
        if not self._buffers and count == self.n:
            # Nothing has left before, so ``rows`` is every row in order: no copy needed.
            self._buffers = dict(values)
            self.written = count
            return
        if not self._buffers:
            self._buffers = {
                name: value.new_empty((self.n, *value.shape[1:])) for name, value in values.items()
            }
        for name, value in values.items():
            self._buffers[name][rows] = value
        self.written += count

    def leave(
        self, rows: Tensor, stop: Tensor, index: int, logits: Tensor, probs: Tensor, conf: Tensor
    ) -> None:
        """The samples ``stop`` (A,) of the running ``rows`` leave at exit ``index``."""
        self.write(
            rows[stop],
            {
                "logits": logits[stop],
                "probs": probs[stop],
                "confidence": conf[stop],
                "exits": rows[stop].new_full((int(stop.sum()),), index),
            },
        )

    @property
    def complete(self) -> bool:
        return self.written == self.n

    def result(self) -> dict[str, Tensor]:
        """The outputs, (n, ...) each; every row must have been written."""
        if not self.complete:
            raise RuntimeError(f"only {self.written} of {self.n} rows were written.")
        return self._buffers


def check_batch(x: object, input_shape: tuple[int | None, ...] | None) -> None:
    """Raise a clear error when ``x`` is not a batch (B, ...) of the given per-sample shape."""
    if not isinstance(x, Tensor):
        raise TypeError(f"`x` must be a torch.Tensor; got {type(x).__name__}.")
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(
            f"`x` must be a batch (B, ...) with B >= 1 samples; got shape {tuple(x.shape)}."
        )
    if input_shape is not None and (
        x.ndim != len(input_shape) + 1
        or any(d is not None and d != s for d, s in zip(input_shape, x.shape[1:], strict=True))
    ):
        expected = "(B, " + ", ".join("*" if d is None else str(d) for d in input_shape) + ")"
        raise ValueError(f"`x` must have shape {expected}; got {tuple(x.shape)}.")
