"""EarlyExitNetwork.infer under threshold vectors and functions: real skipping, the core's rule."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from exitguard.policy import ExitPolicy
from exitguard.risk.configurations import ThresholdFamily
from exitguard.risk.exits import exit_index
from tests.nn.test_network import assert_same_outcome

torch = pytest.importorskip("torch")


def vectors_for(conf: np.ndarray, rng: np.random.Generator, count: int = 6) -> list[list[float]]:
    """Threshold vectors from the confidences' quantiles, some exits disabled."""
    n_exits = conf.shape[1]
    out = []
    for _ in range(count):
        vector = [float(np.quantile(conf[:, e], rng.uniform(0.2, 0.8))) for e in range(n_exits - 1)]
        vector[int(rng.integers(n_exits - 1))] = math.inf
        out.append(vector)
    return out


@pytest.mark.parametrize("model", ["cnn", "vit"])
def test_vectors_real_equals_simulated_equals_the_core(model, cnn_network, vit_network, images):
    network = cnn_network if model == "cnn" else vit_network
    x = images(96, seed=6)
    _, conf = network.exit_confidences(x)  # (96, L)
    for vector in vectors_for(conf.numpy(), np.random.default_rng(0)):
        expected = exit_index(conf.numpy(), vector)  # the risk core's rule
        real = network.infer(x, vector)
        assert_same_outcome(real, network.simulate(x, vector))
        np.testing.assert_array_equal(real.exits.numpy(), expected)
        disabled = [e for e, t in enumerate(vector) if math.isinf(t)]
        assert not np.isin(real.exits.numpy(), disabled).any()
        for row in (0, 40):  # one sample at a time
            assert network.infer(x[row : row + 1], vector).exits.item() == expected[row]
        assert real.threshold == tuple(vector)


def test_a_disabled_exit_does_not_run_its_head(cnn_network, images):
    x = images(32, seed=7)
    calls = [0] * cnn_network.n_exits
    hooks = [
        head.register_forward_hook(lambda *_, e=e: calls.__setitem__(e, calls[e] + 1))
        for e, head in enumerate(cnn_network.heads)
    ]
    try:
        cnn_network.infer(x, [math.inf, 0.0])
    finally:
        for hook in hooks:
            hook.remove()
    assert calls[0] == 0 and calls[1] == 1  # exit 0 disabled; everyone leaves at exit 1


def test_vector_and_function_policies(cnn_network, images):
    x = images(64, seed=8)
    _, conf = cnn_network.exit_confidences(x)
    n_exits = cnn_network.n_exits
    vector = ExitPolicy.from_thresholds([0.6, math.inf], n_exits=n_exits)
    bound = cnn_network.bind_policy(vector)
    assert cnn_network.check_policy(bound) == (0.6, math.inf)
    np.testing.assert_array_equal(
        cnn_network.infer(x, bound).exits.numpy(), exit_index(conf.numpy(), [0.6, math.inf])
    )
    # A threshold function: its vector at the policy's scalar.
    scalar = ExitPolicy.from_thresholds(0.7, n_exits=n_exits)
    function = dataclasses.replace(scalar, threshold_function=ThresholdFamily("scaled", 1.0))
    limits = ThresholdFamily("scaled", 1.0).vector(0.7, n_exits)
    function = cnn_network.bind_policy(function)
    np.testing.assert_array_equal(
        cnn_network.infer(x, function).exits.numpy(), exit_index(conf.numpy(), limits)
    )
    # The all-inf vector is the full model: the backbone alone.
    full = cnn_network.infer(x, [math.inf, math.inf])
    assert full.exits.tolist() == [n_exits - 1] * 64
    torch.testing.assert_close(full.logits, cnn_network.infer(x, math.inf).logits)


def test_bad_vectors_are_refused(cnn_network, images):
    with pytest.raises(ValueError, match=r"one threshold per exit but the last: shape \(2,\)"):
        cnn_network.infer(images(2), [0.5])
    with pytest.raises(ValueError, match=r"`policy` must be a float in \[0, 1\] or inf"):
        cnn_network.infer(images(2), [0.5, 2.0])
