"""Small mechanisms with spread-out decisions, shared by the mechanism tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from exitguard.nn import Cascade, HaltingNetwork, SkipNetwork  # noqa: E402
from exitguard.tasks.classification import CNNConfig, build_classifier  # noqa: E402
from exitguard.tasks.mechanisms.models import (  # noqa: E402
    FullModel,
    SkipConfig,
    SmallCNNConfig,
    build_skip_network,
    build_small_cnn,
)
from tests.nn.conftest import spread_heads  # noqa: E402


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread inside the block (tiny models: more threads only add contention)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def images(n: int, seed: int = 1) -> torch.Tensor:
    """Noisy copies of ten fixed 8x8 patterns: inputs with structure, so outputs vary."""
    templates = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(seed)
    classes = torch.randint(0, 10, (n,), generator=generator)
    return templates[classes] + 0.7 * torch.randn(n, 1, 8, 8, generator=generator)


def _spread(linear: nn.Linear, scale: float, generator: torch.Generator) -> None:
    with torch.no_grad():
        linear.weight.copy_(scale * torch.randn(linear.weight.shape, generator=generator))
        linear.bias.copy_(scale * torch.randn(linear.bias.shape, generator=generator))


def classifier(seed: int = 0):
    torch.manual_seed(seed)
    network = build_classifier(
        CNNConfig(widths=(4, 6, 8), strides=(1, 2, 1), drop_rate=0.0), image_shape=(1, 8, 8)
    )
    spread_heads(network, seed)
    _spread(network.heads[-1].fc, 1.0, torch.Generator().manual_seed(seed + 5))
    return network.eval()


def cascade(seed: int = 0) -> Cascade:
    """Two small CNNs before a 3-exit CNN run to its end; classifiers spread out."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 10)
    members = [
        build_small_cnn(SmallCNNConfig(widths=(4,), strides=(2,))),
        build_small_cnn(SmallCNNConfig(widths=(4, 6), strides=(1, 2))),
    ]
    for member, scale in zip(members, (2.0, 3.0), strict=True):
        _spread(member[-1].fc, scale, generator)
    return Cascade([*members, FullModel(classifier(seed))], input_shape=(1, 8, 8)).eval()


def halting(seed: int = 0) -> HaltingNetwork:
    """A 3-exit CNN with halting units whose outputs spread over (0, 1)."""
    network = classifier(seed)
    torch.manual_seed(seed)
    model = HaltingNetwork.attach(network, images(1), hidden=8)
    generator = torch.Generator().manual_seed(seed + 20)
    for unit in model.units:
        _spread(unit.mlp[-1], 1.5, generator)
    return model.eval()


def skip_network(seed: int = 0) -> SkipNetwork:
    """A skip network whose gate scores spread over (0, 1)."""
    torch.manual_seed(seed)
    network = build_skip_network(SkipConfig(widths=(4, 6), blocks=(2, 2)), image_shape=(1, 8, 8))
    generator = torch.Generator().manual_seed(seed + 30)
    for gate, gated in zip(network.gates, network.gated, strict=True):
        if gated:
            _spread(gate.fc, 2.0, generator)
    return network.eval()


def gap_midpoints(values: np.ndarray, count: int = 6) -> list[float]:
    """Thresholds in the middle of gaps between distinct values, at spread quantiles.

    Away from every value, so that the float noise of running a sample in a batch of another
    size (about 1e-7) cannot move it across a threshold.
    """
    distinct = np.unique(np.asarray(values, dtype=np.float64).ravel())
    gaps = distinct[1:] - distinct[:-1]
    middles = ((distinct[1:] + distinct[:-1]) / 2)[gaps > 1e-5]
    at = np.linspace(0, len(middles) - 1, count + 2)[1:-1].round().astype(int)
    return sorted({float(middles[i]) for i in at})
