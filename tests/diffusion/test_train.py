"""DeeDiff's training loss and a short training run."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from exitguard.tasks.diffusion.model import Denoiser, DenoiserConfig  # noqa: E402
from exitguard.tasks.diffusion.train import (  # noqa: E402
    TrainSettings,
    deediff_loss,
    load_or_train,
    train_denoiser,
)

from .conftest import TINY, digits_images  # noqa: E402


def test_deediff_loss_by_hand():
    noise = torch.tensor([[[[0.5, -1.0]]]])  # (B=1, C=1, H=1, W=2)
    eps = torch.tensor([[[[[0.0, -1.0]]], [[[1.0, 0.0]]], [[[0.5, -0.5]]]]])  # (1, L=3, 1, 1, 2)
    u = torch.tensor([[[[[0.2, 0.4]]], [[[0.6, 0.8]]]]])  # (1, 2, 1, 1, 2)
    loss = deediff_loss(eps, u, noise)
    final = (0.0**2 + 0.5**2) / 2
    errors = np.array([[-0.5, 0.0], [0.5, 1.0]])  # g_i - eps, heads 0 and 1
    uem = 2 * np.mean((np.array([[0.2, 0.4], [0.6, 0.8]]) - np.tanh(np.abs(errors))) ** 2)
    weighted = 2 * np.mean((1 - np.array([[0.2, 0.4], [0.6, 0.8]])) * errors**2)
    assert float(loss.noise) == pytest.approx(final)
    assert float(loss.uncertainty) == pytest.approx(uem)
    assert float(loss.weighted) == pytest.approx(weighted)
    assert float(loss.total) == pytest.approx(final + uem + weighted)


def test_deediff_loss_gradients_are_detached_where_the_paper_says():
    noise = torch.randn(2, 1, 4, 4)
    eps = torch.randn(2, 3, 1, 4, 4, requires_grad=True)
    u = torch.rand(2, 2, 1, 4, 4, requires_grad=True)
    deediff_loss(eps, u, noise).uncertainty.backward()
    assert eps.grad is None  # the UEM's target tanh|g - eps| is detached
    deediff_loss(eps, u, noise).weighted.backward()
    assert u.grad is not None and float(u.grad.abs().sum()) > 0  # from the first call only
    grad_u = u.grad.clone()
    deediff_loss(eps, u, noise).weighted.backward()
    assert torch.equal(u.grad, grad_u)  # (1 - u) is detached in the weighted term


def test_deediff_loss_shapes():
    with pytest.raises(ValueError, match=r"`eps` must be \(B, L, C, H, W\) and `uncertainty`"):
        deediff_loss(
            torch.zeros(2, 3, 1, 4, 4), torch.zeros(2, 3, 1, 4, 4), torch.zeros(2, 1, 4, 4)
        )
    with pytest.raises(ValueError, match=r"`noise` must have shape \(2, 1, 4, 4\)"):
        deediff_loss(torch.zeros(2, 3, 1, 4, 4), torch.zeros(2, 2, 1, 4, 4), torch.zeros(2, 4, 4))


def uem_check(model, images):
    """The UEM term of the loss on a fixed batch (seeded timesteps and noise), and the
    correlation of each sample's mean predicted uncertainty with its mean target."""
    from exitguard.tasks.diffusion.sample import Schedule

    generator = torch.Generator().manual_seed(11)
    t = torch.randint(0, model.config.steps, (images.shape[0],), generator=generator)
    noise = torch.randn(images.shape, generator=generator)
    with torch.no_grad():
        out = model(Schedule.of(model).add_noise(images, noise, t), t)
    target = torch.tanh((out.eps[:, :-1] - noise[:, None]).abs()).flatten(1).mean(1)  # (B,)
    predicted = out.uncertainty.flatten(1).mean(1)  # (B,)
    correlation = np.corrcoef(predicted.numpy(), target.numpy())[0, 1]
    return float(deediff_loss(out.eps, out.uncertainty, noise).uncertainty), correlation


def test_uncertainty_heads_learn():
    torch.manual_seed(1)
    model = Denoiser(DenoiserConfig(**TINY))
    images = digits_images()
    before, _ = uem_check(model, images[:256])
    settings = TrainSettings(iterations=200, batch_size=32, lr=3e-3, warmup=10, log_every=50)
    history = train_denoiser(model, images, settings=settings)
    assert history.iteration.tolist() == [50, 100, 150, 200]
    after, correlation = uem_check(model, images[:256])
    assert after < 0.75 * before  # 0.38 -> 0.25 at seed 1
    assert correlation > 0.5  # 0.82 at seed 1 (0.25 after 100 iterations)
    assert history.uncertainty[-1] < history.uncertainty[0]
    assert history.noise[-1] < history.noise[0]
    assert not model.training


def test_training_is_seeded_and_cached(tmp_path):
    images = digits_images()[:64]
    settings = TrainSettings(iterations=3, batch_size=8, warmup=1, log_every=1)
    config = DenoiserConfig(**TINY)
    logs: list[str] = []

    def load(cache_dir):
        return load_or_train(
            images,
            dataset="digits",
            data_fingerprint="test",
            config=config,
            settings=settings,
            cache_dir=cache_dir,
            progress=False,
            log=logs.append,
        )

    def assert_same_weights(a, b):
        pairs = zip(a.module.state_dict().values(), b.module.state_dict().values(), strict=True)
        assert all(torch.equal(x, y) for x, y in pairs)

    first, second = load(tmp_path), load(tmp_path)
    assert not first.from_cache and second.from_cache
    assert_same_weights(first, second)
    # Seeded: training again from scratch (another cache folder) gives the same weights.
    again = load(tmp_path / "other")
    assert not again.from_cache
    assert_same_weights(first, again)
    assert first.metadata["description"]["model"]["depth"] == 5
    assert len(first.metadata["history"]["uncertainty"]) == 3
    with pytest.raises(ValueError, match=r"`images` must have shape \(N, 1, 8, 8\)"):
        train_denoiser(first.module, torch.zeros(4, 1, 6, 6), settings=settings)
