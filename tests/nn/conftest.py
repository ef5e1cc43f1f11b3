"""Small models and helpers shared by the exitguard.nn tests."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from exitguard.policy import ExitPolicy, guarantee_text  # noqa: E402


class Block(nn.Module):
    """conv-BN-ReLU, then a residual conv-BN, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(x)))


class TinyResNet(nn.Module):
    """A 3-stage ResNet-style CNN on 3x16x16 inputs with 5 classes."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.layer1 = Block(3, 8, 1)
        self.layer2 = Block(8, 16, 2)
        self.layer3 = Block(16, 32, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class TinyViT(nn.Module):
    """A ViT-like encoder: 4x4 patches of 3x16x16, a class token, 4 equal blocks."""

    def __init__(self, dim: int = 16, depth: int = 4, num_classes: int = 5) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.Sequential(
            *[
                nn.TransformerEncoderLayer(
                    dim, 2, 2 * dim, dropout=0.0, batch_first=True, norm_first=True
                )
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, 16, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.blocks(x)  # (B, 17, D)
        return self.head(self.norm(x)[:, 0])


class TinySegNet(nn.Module):
    """A dense-output CNN: per-pixel logits (B, 4, 8, 8) on 3x8x8 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.classifier = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.classifier(self.layer2(self.layer1(x)))


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm layers non-trivial statistics, as a trained model has."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
    return model


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """One torch thread for the tiny models here (see tests/conftest.py)."""


@pytest.fixture
def resnet_factory():
    """A function that builds a fresh TinyResNet (random weights)."""
    return TinyResNet


@pytest.fixture
def resnet():
    torch.manual_seed(0)
    return randomise_batchnorm(TinyResNet()).eval()


@pytest.fixture
def vit():
    torch.manual_seed(0)
    return TinyViT().eval()


@pytest.fixture
def cnn_network(resnet):
    from exitguard.nn import attach_exits

    torch.manual_seed(1)
    network = attach_exits(resnet, at=["layer1", "layer2"], input_shape=(3, 16, 16))
    return spread_heads(network).eval()


@pytest.fixture
def vit_network(vit):
    from exitguard.nn import attach_exits

    torch.manual_seed(1)
    network = attach_exits(
        vit,
        at=["blocks.0", "blocks.1", "blocks.2"],
        input_shape=(3, 16, 16),
        head_options={"pool": "cls"},
    )
    return spread_heads(network).eval()


def _images(n: int, seed: int = 0, shape=(3, 16, 16)):
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def _midpoint_thresholds(confidences, count: int = 3) -> list[float]:
    """Thresholds at quantiles of each early exit's confidences, moved to the middle of the
    gap between two neighbouring distinct confidences.

    Away from every confidence, so that the float noise (~1e-7) of running a sample in
    batches of other sizes cannot move it across a threshold; spread so that every exit
    is used.
    """
    conf = np.asarray(confidences)
    values = np.unique(conf[:, :-1].ravel())
    gaps = values[1:] - values[:-1]
    middles = ((values[1:] + values[:-1]) / 2)[gaps > 1e-5]
    thresholds: set[float] = set()
    for exit_ in range(conf.shape[1] - 1 if len(middles) else 0):
        for q in np.linspace(0.2, 0.8, count):
            at = np.searchsorted(middles, np.quantile(conf[:, exit_], q))
            thresholds.add(float(middles[min(at, len(middles) - 1)]))
    return sorted(thresholds)


def spread_heads(network, seed: int = 0):
    """Re-draw the exit classifiers with larger weights, so that confidences spread out."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in network.heads[:-1]:
            head.fc.weight.copy_(torch.randn(head.fc.weight.shape, generator=generator))
    return network


def _make_policy(threshold: float | None = 0.5, **fields) -> ExitPolicy:
    """A consistent UCB-WSR policy at ``threshold`` (the full model for ``math.inf``)."""
    full = threshold is not None and math.isinf(threshold)
    values = {
        "threshold": threshold,
        "index": 0 if full else 3,
        "procedure": "ucb-wsr",
        "target_risk": 0.1,
        "delta": 0.1,
        "n": 100,
        "empirical_risk": 0.0,
        "upper_bound": 0.05,
        "p_value": None,
        "expected_cost": None,
        "full_cost": None,
        "certified": not full,
        "loss_bound": 1.0,
        "sample_order": "random",
        "order_seed": 0,
    }
    values.update(fields)
    values["guarantee"] = guarantee_text(
        values["procedure"], values["target_risk"], values["delta"]
    )
    return ExitPolicy(**values)


@pytest.fixture
def images():
    """``images(n, seed=0, shape=(3, 16, 16))``: a seeded batch of random inputs."""
    return _images


@pytest.fixture
def midpoint_thresholds():
    return _midpoint_thresholds


@pytest.fixture
def make_policy():
    """``make_policy(threshold, **fields)``: an ExitPolicy with plausible defaults."""
    return _make_policy
