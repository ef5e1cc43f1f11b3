"""Fixtures for the diffusion tests: a tiny U-ViT denoiser, briefly trained on 8x8 digits."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.conftest import torch_threads  # noqa: E402


@pytest.fixture(scope="package", autouse=True)
def _one_thread():
    """One thread for every test here, module and session fixtures included: the models are
    tiny, and extra threads only contend with each other."""
    with torch_threads(1):
        yield


TINY = {
    "image_size": 8,
    "patch_size": 2,
    "width": 32,
    "depth": 5,
    "n_heads": 2,
    "steps": 12,
    "reference_steps": 120,
}


def digits_images():
    from exitguard.data.images import load_dataset

    return torch.from_numpy(load_dataset("digits").images) * 2.0 - 1.0  # (1797, 1, 8, 8)


@pytest.fixture(scope="package")
def tiny_model():
    """A 5-exit denoiser with T = 12 steps, trained for 60 iterations (about a second)."""
    from exitguard.tasks.diffusion.model import Denoiser, DenoiserConfig
    from exitguard.tasks.diffusion.train import TrainSettings, train_denoiser

    torch.manual_seed(0)
    model = Denoiser(DenoiserConfig(**TINY))
    train_denoiser(
        model,
        digits_images(),
        settings=TrainSettings(iterations=60, batch_size=64, lr=3e-3, warmup=10, log_every=20),
    )
    return model


@pytest.fixture(scope="package")
def middle_threshold(tiny_model):
    """A threshold at which roughly half of the steps of pilot samples leave early."""
    from exitguard.tasks.diffusion.sample import sample_noise, simulate

    noise = sample_noise(np.arange(8), seed=5, steps=12, image_shape=(1, 8, 8), stream=1)
    pilot = simulate(tiny_model, noise, threshold=math.inf)
    best = pilot.confidence[..., 1:].max(-1).values  # (8, T)
    return float(np.round(float(best.median()), 6))
