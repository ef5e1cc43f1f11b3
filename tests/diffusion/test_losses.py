"""Bounded image losses: SSIM against a per-window loop, bounds, identical images, features."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from exitguard.tasks.diffusion.losses import (  # noqa: E402
    FeatureDistance,
    cosine_distance,
    gaussian_window,
    ssim,
    ssim_loss,
    ssim_window,
)


def ssim_by_loop(x: np.ndarray, y: np.ndarray, size: int, sigma: float) -> float:
    """Wang et al.'s SSIM of two (H, W) images in [0, 1], one window position at a time."""
    coords = np.arange(size) - (size - 1) / 2
    g = np.exp(-(coords**2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for i in range(x.shape[0] - size + 1):
        for j in range(x.shape[1] - size + 1):
            a, b = x[i : i + size, j : j + size], y[i : i + size, j : j + size]
            mu_a, mu_b = (w * a).sum(), (w * b).sum()
            var_a = (w * (a - mu_a) ** 2).sum()
            var_b = (w * (b - mu_b) ** 2).sum()
            cov = (w * (a - mu_a) * (b - mu_b)).sum()
            values.append(
                (2 * mu_a * mu_b + c1)
                * (2 * cov + c2)
                / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
            )
    return float(np.mean(values))


@pytest.mark.parametrize(("size", "sigma"), [(5, 1.0), (3, 0.8), (7, 1.5)])
def test_ssim_matches_a_per_window_loop(size, sigma):
    rng = np.random.default_rng(7)
    x = rng.random((2, 1, 8, 9))
    y = np.clip(x + 0.2 * rng.standard_normal(x.shape), 0, 1)
    got = ssim(torch.from_numpy(x), torch.from_numpy(y), window_size=size, sigma=sigma)
    expected = [ssim_by_loop(x[i, 0], y[i, 0], size, sigma) for i in range(2)]
    # Same formula, float64 both ways; only the summation order differs.
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)


def test_ssim_averages_channels():
    rng = np.random.default_rng(8)
    x, y = rng.random((1, 2, 6, 6)), rng.random((1, 2, 6, 6))
    got = float(ssim(torch.from_numpy(x), torch.from_numpy(y), window_size=3, sigma=1.0)[0])
    expected = np.mean([ssim_by_loop(x[0, c], y[0, c], 3, 1.0) for c in range(2)])
    assert got == pytest.approx(expected, abs=1e-12)


def test_ssim_loss_bounds_and_identity():
    rng = np.random.default_rng(9)
    x = torch.from_numpy(rng.random((6, 1, 8, 8)).astype(np.float32))
    y = torch.from_numpy(rng.random((6, 1, 8, 8)).astype(np.float32))
    pairs = [(x, y), (x, 1 - x), (torch.zeros_like(x), torch.ones_like(x)), (x, x.clone())]
    for a, b in pairs:
        loss = ssim_loss(a, b)
        assert loss.dtype == torch.float64 and loss.shape == (6,)
        assert bool(((loss >= 0) & (loss <= 1)).all())
    assert torch.equal(ssim_loss(x, x.clone()), torch.zeros(6, dtype=torch.float64))
    assert float(ssim_loss(x, 1 - x).min()) > float(ssim_loss(x, (x + 0.01).clamp(0, 1)).max())


def test_default_window():
    assert ssim_window(8) == (5, 1.0)
    assert ssim_window(28) == (11, 1.5)
    w = gaussian_window(5, 1.0)
    assert float(w.sum()) == pytest.approx(1.0) and torch.equal(w, w.T)


def test_ssim_bad_inputs():
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"`window_size` must be an integer in \[1, 8\]"):
        ssim(x, x, window_size=9)
    with pytest.raises(ValueError, match=r"`x` and `y` must have the same shape; got"):
        ssim(x, torch.zeros(2, 1, 8, 7))
    with pytest.raises(ValueError, match=r"`x` must be a batch of images \(B, C, H, W\)"):
        ssim(torch.zeros(8, 8), torch.zeros(8, 8))
    with pytest.raises(TypeError, match=r"`y` must be a torch\.Tensor; got ndarray"):
        ssim_loss(x, np.zeros((2, 1, 8, 8)))


def test_cosine_distance_bounds():
    a = torch.tensor([[1.0, 0.0], [1.0, 2.0], [0.0, 0.0], [3.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [2.0, 4.0], [1.0, 1.0], [3.0, 1.0]])
    got = cosine_distance(a, b)
    assert got.tolist()[0] == pytest.approx(1.0)
    assert got.tolist()[1] == pytest.approx(0.0, abs=1e-12)
    assert got.tolist()[2] == pytest.approx(1.0)
    assert got.tolist()[3] == 0.0


def test_feature_distance_with_a_small_classifier():
    from exitguard.tasks.classification import CNNConfig, build_classifier

    torch.manual_seed(0)
    network = build_classifier(CNNConfig(widths=(4, 6), strides=(1, 2)), image_shape=(1, 8, 8))
    network.eval()
    distance = FeatureDistance(network, batch_size=3)
    rng = np.random.default_rng(10)
    x = torch.from_numpy(rng.random((5, 1, 8, 8)).astype(np.float32))
    y = torch.from_numpy(rng.random((5, 1, 8, 8)).astype(np.float32))
    loss = distance(x, y)
    assert loss.shape == (5,) and bool(((loss >= 0) & (loss <= 1)).all())
    assert torch.equal(distance(x, x.clone()), torch.zeros(5, dtype=torch.float64))
    features = distance.features(x)
    assert features.shape == (5, 6) and bool((features >= 0).all())
    expected = 1 - torch.nn.functional.cosine_similarity(
        features.double(), distance.features(y).double(), dim=1
    )
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    assert not math.isnan(float(loss.sum()))
