"""Fixtures for the distributed tests: one local Ray with 2 CPUs per test module, tiny models."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray (2 CPUs, no dashboard), started once per module and shut down after it."""
    ray = pytest.importorskip("ray", reason='needs Ray: pip install "exitguard[ray]"')
    pytest.importorskip("torch")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def digits_classifier():
    """An untrained 5-exit CNN (fixed seed), its payload and 300 digits with labels."""
    torch = pytest.importorskip("torch")
    from exitguard.data.images import load_dataset
    from exitguard.distributed.models import classifier_payload
    from exitguard.tasks.classification import CNNConfig, build_classifier

    data = load_dataset("digits")
    config = CNNConfig(widths=(8, 12, 16, 24, 32), strides=(1, 1, 2, 1, 2))
    torch.manual_seed(0)
    network = build_classifier(config, image_shape=data.image_shape).eval()
    payload = classifier_payload(network, config, image_shape=data.image_shape)
    held = data.subset(np.arange(300))  # numpy indexing: the strides the demo's data has
    assert held.images.strides[1] != held.images.strides[0]  # a size-1 axis with its own stride
    return network, payload, held.images, held.labels


@pytest.fixture(scope="module")
def tiny_denoiser():
    """An untrained 5-exit denoiser with T = 8 steps and a 6-threshold grid from pilot seeds."""
    torch = pytest.importorskip("torch")
    from exitguard.tasks.diffusion.model import Denoiser, DenoiserConfig
    from exitguard.tasks.diffusion.sweep import pilot_thresholds

    torch.manual_seed(0)
    config = DenoiserConfig(
        image_size=8, patch_size=2, width=32, depth=5, n_heads=2, steps=8, reference_steps=80
    )
    model = Denoiser(config).eval()
    grid = pilot_thresholds(model, seed=3, n=8, count=6)
    assert np.isinf(grid[0]) and grid.size >= 4
    return model, grid
