"""Sampling under threshold vectors (per exit) and schedules (per step and exit)."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from exitguard.policy import ExitPolicy  # noqa: E402
from exitguard.risk.exits import first_exit  # noqa: E402
from exitguard.tasks.diffusion.sample import (  # noqa: E402
    exit_limits,
    sample,
    sample_full,
    simulate,
)
from tests.diffusion.test_sample import noise_of  # noqa: E402


def test_vector_exits_real_equal_simulated_equal_the_core(tiny_model, middle_threshold):
    noise = noise_of(range(8))
    vector = torch.tensor([[0.0, middle_threshold, math.inf, 0.8 * middle_threshold]])  # (1, L-1)
    real = sample(tiny_model, noise, threshold=vector)
    reference = simulate(tiny_model, noise, threshold=vector)
    assert torch.equal(real.exits, reference.exits)
    torch.testing.assert_close(real.images, reference.images, rtol=0, atol=1e-5)
    assert not bool((real.exits == 2).any())  # the disabled exit
    assert not bool((real.exits == 0).any())  # before earliest_exit = 1, despite threshold 0
    # The simulated exits follow the core's rule on the recorded confidences.
    limits = vector.expand(8, -1).clone()  # (B, L-1)
    limits[:, 0] = math.inf  # earliest_exit
    expected = first_exit(reference.confidence, limits[:, None, :])  # (B, T)
    assert torch.equal(expected, reference.exits)
    assert real.threshold.shape == (8, 12, 4)


def test_a_constant_vector_is_the_scalar(tiny_model, middle_threshold):
    noise = noise_of(range(5))
    scalar = sample(tiny_model, noise, threshold=middle_threshold)
    vector = sample(tiny_model, noise, threshold=torch.full((1, 4), middle_threshold))
    assert torch.equal(scalar.exits, vector.exits)
    assert torch.equal(scalar.images, vector.images)
    full = sample(tiny_model, noise, threshold=torch.full((1, 4), math.inf))
    assert torch.equal(full.images, sample_full(tiny_model, noise).images)  # bit for bit


def test_per_step_schedule_and_policy(tiny_model, middle_threshold):
    noise = noise_of(range(6))
    steps = tiny_model.config.steps
    schedule = np.full((1, steps, 4), math.inf)
    schedule[:, steps // 2 :, :] = middle_threshold  # exit only in the second half of the steps
    real = sample(tiny_model, noise, threshold=schedule)
    assert bool((real.exits[:, : steps // 2] == 4).all())
    late = sample(tiny_model, noise, threshold=middle_threshold).exits[:, steps // 2 :]
    assert bool((late < 4).any())
    assert torch.equal(simulate(tiny_model, noise, threshold=schedule).exits, real.exits)
    policy = ExitPolicy.from_thresholds([math.inf, middle_threshold, math.inf, math.inf])
    by_policy = sample(tiny_model, noise, threshold=policy)
    assert set(by_policy.exits.unique().tolist()) <= {1, 4}


def test_threshold_shapes_are_checked(tiny_model):
    with pytest.raises(ValueError, match=r"shape \(2,\), \(2, 4\) or \(2, 12, 4\)"):
        exit_limits(tiny_model, np.zeros((2, 3)), 2, earliest_exit=1)
    with pytest.raises(ValueError, match=r"shape \(4,\) for 5 exits; got shape \(2,\)"):
        exit_limits(tiny_model, ExitPolicy.from_thresholds([0.5, 0.5]), 2, earliest_exit=1)
