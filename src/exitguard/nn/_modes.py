"""Train/eval modes switched for a block and restored after it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def kept_modes(module: nn.Module) -> Iterator[None]:
    """Inside the block the caller may switch modes freely; after it (even on an error) every
    submodule of ``module`` is back in the mode it had."""
    modes = {part: part.training for part in module.modules()}
    try:
        yield
    finally:
        for part, mode in modes.items():
            part.train(mode)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule of ``module`` in eval mode inside the block, back in its own mode after."""
    with kept_modes(module):
        module.eval()
        yield
