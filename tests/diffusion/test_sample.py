"""Sampling: never-exit equivalence, the same-noise guarantee, real vs simulated exits."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from exitguard.tasks.diffusion.sample import (  # noqa: E402
    Schedule,
    check_threshold,
    generate,
    linear_betas,
    sample,
    sample_full,
    sample_noise,
    simulate,
)

SHAPE = (1, 8, 8)


def noise_of(indices, *, seed=3, stream=0):
    return sample_noise(np.asarray(indices), seed=seed, steps=12, image_shape=SHAPE, stream=stream)


def test_linear_betas_scaled_to_reference_steps():
    np.testing.assert_allclose(linear_betas(1000), np.linspace(1e-4, 0.02, 1000), rtol=0, atol=0)
    betas = linear_betas(100)
    assert betas[0] == pytest.approx(1e-3) and betas[-1] == pytest.approx(0.2)
    assert np.prod(1 - betas) < 1e-4  # x_T is (almost) pure noise
    with pytest.raises(ValueError, match=r"`steps` must be a positive integer; got 0\."):
        linear_betas(0)


def test_schedule_step_is_the_posterior_mean_plus_noise():
    schedule = Schedule(linear_betas(10, reference_steps=100))
    abar = schedule.alpha_bar
    x, eps, z = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    t = 5
    x0 = ((x - math.sqrt(1 - abar[t]) * eps) / math.sqrt(abar[t])).clamp(-1, 1)
    beta = schedule.betas[t]
    mean = (math.sqrt(abar[t - 1]) * beta * x0 + math.sqrt(1 - beta) * (1 - abar[t - 1]) * x) / (
        1 - abar[t]
    )
    expected = mean + math.sqrt(beta) * z
    torch.testing.assert_close(schedule.step(x, eps, t, z, clip=True), expected)


def test_noise_depends_only_on_seed_stream_and_index():
    batch = noise_of(range(10))
    assert batch.shape == (10, 12, *SHAPE) and batch.dtype == torch.float32
    assert torch.equal(noise_of([7, 3]), batch[[7, 3]])
    assert torch.equal(noise_of([3]), batch[3:4])
    assert not torch.equal(noise_of([3], seed=4), batch[3:4])
    assert not torch.equal(noise_of([3], stream=1), batch[3:4])
    with pytest.raises(ValueError, match=r"`seed` must be a non\-negative integer; got \-1\."):
        sample_noise([0], seed=-1, steps=12, image_shape=SHAPE)


def test_the_plain_sampler_runs_the_chain_of_the_module_notes(tiny_model):
    """Step s denoises timestep T - 1 - s with the full model and then adds noise slice s + 1."""
    noise = noise_of(range(3))
    schedule = Schedule.of(tiny_model)
    steps = schedule.steps
    x = noise[:, 0]  # x_T
    with torch.inference_mode():
        for s in range(steps):  # the oracle, written out
            t = steps - 1 - s
            z = noise[:, s + 1] if t > 0 else None
            x = schedule.step(x, tiny_model.full(x, t), t, z, clip=True)
    assert torch.equal(sample_full(tiny_model, noise).images, x)


def test_never_exit_reproduces_the_plain_sampler(tiny_model):
    noise = noise_of(range(6))
    plain = sample_full(tiny_model, noise)
    never = sample(tiny_model, noise, threshold=math.inf)
    assert torch.equal(never.images, plain.images)  # bit for bit
    assert never.exits.tolist() == [[4] * 12] * 6


def test_same_noise_across_thresholds_and_batches(tiny_model, middle_threshold):
    """Each sample's trajectory depends on its noise and threshold only, not on its batch."""
    ids = np.arange(8)
    whole = sample(tiny_model, noise_of(ids), threshold=middle_threshold)
    alone = [sample(tiny_model, noise_of([i]), threshold=middle_threshold) for i in (2, 5)]
    for i, single in zip((2, 5), alone, strict=True):
        assert torch.equal(single.exits[0], whole.exits[i])
        torch.testing.assert_close(single.images[0], whole.images[i], rtol=0, atol=1e-5)
    # Mixed thresholds in one batch: the never-exit rows are the plain sampler's images, the
    # others are those of their own threshold run alone.
    mixed = torch.tensor([math.inf, middle_threshold] * 4, dtype=torch.float64)
    both = sample(tiny_model, noise_of([0, 0, 1, 1, 2, 2, 3, 3]), threshold=mixed)
    plain = sample_full(tiny_model, noise_of(range(4)))
    torch.testing.assert_close(both.images[0::2], plain.images, rtol=0, atol=1e-5)
    torch.testing.assert_close(both.images[1::2], whole.images[:4], rtol=0, atol=1e-5)
    assert torch.equal(both.exits[1::2], whole.exits[:4])
    # generate() in batches of 3 sees the same noise as one batch of 8.
    batched = generate(tiny_model, ids, seed=3, threshold=middle_threshold, batch_size=3)
    assert torch.equal(batched.exits, whole.exits)
    torch.testing.assert_close(batched.images, whole.images, rtol=0, atol=1e-5)


def test_real_exits_equal_simulated_exits(tiny_model, middle_threshold):
    noise = noise_of(range(10))
    real = sample(tiny_model, noise, threshold=middle_threshold)
    reference = simulate(tiny_model, noise, threshold=middle_threshold)
    exits = real.exits
    assert 0 < float((exits < 4).double().mean()) < 1  # some steps exit early, some do not
    assert bool((exits >= 1).all())  # never before the earliest exit
    assert torch.equal(exits, reference.exits)
    torch.testing.assert_close(real.images, reference.images, rtol=0, atol=1e-5)
    # The simulated exits follow the exit rule on the recorded confidences.
    conf = reference.confidence  # (B, T, L-1)
    fires = conf[..., 1:] >= middle_threshold
    first = torch.where(fires.any(-1), fires.double().argmax(-1) + 1, torch.tensor(4))
    assert torch.equal(first, reference.exits)


def test_lower_thresholds_exit_earlier(tiny_model, middle_threshold):
    noise = noise_of(range(6))
    depth = [
        float(sample(tiny_model, noise, threshold=value).exits.double().mean())
        for value in (1.0, middle_threshold, 0.0)
    ]
    assert depth[0] >= depth[1] >= depth[2] == 1.0


def test_threshold_validation(tiny_model):
    noise = noise_of([0])
    message = r"`threshold` must be a float in \[0, 1\] or inf \(never exit early\); got 1.5."
    with pytest.raises(ValueError, match=message):
        sample(tiny_model, noise, threshold=1.5)
    with pytest.raises(ValueError, match=r"or inf \(never exit early\); got -inf."):
        sample(tiny_model, noise, threshold=-math.inf)
    with pytest.raises(TypeError, match="`threshold` must be a float in"):
        sample(tiny_model, noise, threshold=True)
    with pytest.raises(ValueError, match=r"one value per sample \(1\); got shape \(2,\)"):
        check_threshold([0.5, 0.5], 1)
    with pytest.raises(
        ValueError,
        match=r"`earliest_exit` must be an integer in \[0, 4\] \(the model has 5 exits\); "
        r"got -1.",
    ):
        sample(tiny_model, noise, earliest_exit=-1)
    with pytest.raises(ValueError, match=r"`noise` must have shape \(B, 12, 1, 8, 8\)"):
        sample(tiny_model, torch.zeros(1, 12, 1, 7, 7))
