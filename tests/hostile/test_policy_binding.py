"""Inference refuses a policy that does not record its network, unless told so explicitly."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from torch import nn  # noqa: E402

from exitguard import calibrate  # noqa: E402
from exitguard.nn import EarlyExitNetwork, collect, load_policy, save_policy  # noqa: E402


@pytest.fixture
def network():
    torch.manual_seed(0)
    stages = [nn.Linear(4, 8), nn.Sequential(nn.ReLU(), nn.Linear(8, 3))]
    return EarlyExitNetwork(stages, [nn.Linear(8, 3)], input_shape=(4,)).eval()


@pytest.fixture
def x():
    return torch.randn(64, 4, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def unbound(network, x):
    outputs = collect(network, x)
    labels = outputs.probs[:, -1].argmax(-1)
    policy = calibrate(outputs.probs, labels, target_risk=0.3, delta=0.2, procedure="naive")
    assert policy.n_exits is None or policy.model_fingerprint is None
    return policy


BIND_HINT = r"bind it: `policy = network\.bind_policy\(policy\)`"


@pytest.mark.parametrize("method", ["infer", "simulate"])
def test_an_unbound_policy_is_refused_with_the_way_to_bind_it(network, x, unbound, method):
    run = getattr(network, method)
    with pytest.raises(ValueError, match=BIND_HINT):
        run(x, unbound)
    bound = network.bind_policy(unbound)
    assert bound.n_exits == network.n_exits and bound.model_fingerprint == network.fingerprint
    expected = run(x, float(unbound.threshold)).exits
    assert torch.equal(run(x, bound).exits, expected)
    assert torch.equal(run(x, unbound, allow_unbound=True).exits, expected)  # explicit opt-in


@pytest.mark.parametrize("field", ["n_exits", "model_fingerprint"])
def test_a_policy_missing_either_model_field_is_refused(network, x, unbound, field):
    partial = dataclasses.replace(network.bind_policy(unbound), **{field: None})
    with pytest.raises(ValueError, match=BIND_HINT):
        network.infer(x, partial)


def test_a_bare_threshold_stays_allowed(network, x):
    assert network.infer(x, 0.5).exits.shape == (64,)
    assert network.infer(x, math.inf).exits.tolist() == [1] * 64


def test_an_unbound_policy_file_is_refused_on_load(network, unbound, tmp_path):
    unbound.save(tmp_path / "unbound.json")
    with pytest.raises(ValueError, match=r"unbound\.json: .*" + BIND_HINT):
        load_policy(tmp_path / "unbound.json", network=network)
    policy = load_policy(tmp_path / "unbound.json", network=network, allow_unbound=True)
    assert policy.threshold == unbound.threshold
    path = save_policy(unbound, tmp_path / "bound.json", network=network)
    assert load_policy(path, network=network).model_fingerprint == network.fingerprint


def test_a_policy_bound_to_another_network_cannot_be_rebound(network, unbound):
    torch.manual_seed(0)
    other = EarlyExitNetwork(
        [nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)], [nn.Linear(8, 3), nn.Linear(8, 3)]
    )
    foreign = other.bind_policy(unbound.with_model(n_exits=3))
    with pytest.raises(ValueError, match=r"calibrated for a network with 3 exits"):
        network.bind_policy(foreign)
    assert np.isfinite(unbound.threshold)
