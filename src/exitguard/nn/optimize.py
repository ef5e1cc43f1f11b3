"""Inference-time rewrites of an early-exit network that keep what it computes.

Two classic rewrites make a CNN's saved FLOPs show up as saved time on a CPU:

* **BatchNorm folding.** In eval mode a BatchNorm after a convolution is an affine map per
  channel, so it folds into the convolution's weights and bias: one pass over the activation
  instead of two (BatchNorm on a large early feature map is pure memory traffic).
* **Channels-last memory format** (NHWC): oneDNN's convolutions are faster on it, and the
  batch compaction of :meth:`EarlyExitNetwork.infer` (boolean row selection) keeps it.

:func:`optimize_for_inference` returns a new network (the given one is not changed) whose
exit outputs equal the original's up to float rounding (tested to 1e-4 relative on the
project's models). Calibrate and serve with the *same* network: collect the exit outputs
for calibration with the optimised one, because a confidence within ~1e-6 of a threshold
may exit differently after the rewrite. Stages that torch.fx cannot trace (e.g. some
wrapped third-party modules) are kept as they are and listed in the report.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import torch
from torch import Tensor, nn

from exitguard.nn.network import EarlyExitNetwork


class ToChannelsLast(nn.Module):
    """Puts a 4-D input into channels-last memory format (values unchanged)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


@dataclasses.dataclass(frozen=True)
class OptimizeReport:
    """What :func:`optimize_for_inference` did.

    Attributes
    ----------
    folded : tuple of str
        Modules (``stages.0``, ``heads.2``, ...) whose BatchNorms were folded.
    kept : tuple of str
        Modules that could not be traced and were kept as they are, with the reason.
    channels_last : bool
    """

    folded: tuple[str, ...]
    kept: tuple[str, ...]
    channels_last: bool


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _fold(module: nn.Module) -> nn.Module:
    with warnings.catch_warnings():  # torch's own modules warn about torch.jit on import
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.fx.experimental.optimization import fuse

    return fuse(module)  # conv -> BatchNorm pairs folded; a traced copy in eval mode


def optimize_for_inference(
    network: EarlyExitNetwork, *, fold_batchnorm: bool = True, channels_last: bool = False
) -> tuple[EarlyExitNetwork, OptimizeReport]:
    """A copy of ``network`` rewritten for faster inference, with the same exit outputs.

    Parameters
    ----------
    network : EarlyExitNetwork
    fold_batchnorm : bool, default True
        Fold every convolution -> BatchNorm pair of each stage and head into one convolution
        (eval-mode statistics; the copy is in eval mode and meant for inference only).
    channels_last : bool, default False
        Store convolution weights and the activations in channels-last format; the input is
        converted on entry. Measure before keeping it: it helps most convolutions on CPU,
        not all (``benchmarks/classification.py`` prints both).

    Returns
    -------
    (EarlyExitNetwork, OptimizeReport)
        The copy (same confidence measure, input shape and exit count) and what was done.
    """
    if not isinstance(network, EarlyExitNetwork):
        raise TypeError(f"`network` must be an EarlyExitNetwork; got {type(network).__name__}.")
    for name, value in (("fold_batchnorm", fold_batchnorm), ("channels_last", channels_last)):
        if not isinstance(value, bool):
            raise TypeError(f"`{name}` must be True or False; got {value!r}.")
    copied = copy.deepcopy(network).eval()
    folded: list[str] = []
    kept: list[str] = []
    if fold_batchnorm:
        for group in ("stages", "heads"):
            modules: nn.ModuleList = getattr(copied, group)
            for index, module in enumerate(modules):
                if not _has_batchnorm(module):
                    continue
                try:
                    modules[index] = _fold(module)
                except Exception as error:  # any tracing failure keeps the module as it is
                    kept.append(f"{group}.{index} ({type(error).__name__}: {error})"[:200])
                else:
                    folded.append(f"{group}.{index}")
    result = copied  # same confidence measure and input shape
    if channels_last:
        result = result.to(memory_format=torch.channels_last)
        result.stages[0] = nn.Sequential(ToChannelsLast(), result.stages[0])
    result.eval()
    result.requires_grad_(False)
    return result, OptimizeReport(tuple(folded), tuple(kept), channels_last)
