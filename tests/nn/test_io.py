"""Weights as safetensors, policies as JSON, and the checks that they fit the network."""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from exitguard.nn import (  # noqa: E402
    attach_exits,
    load_policy,
    load_weights,
    save_policy,
    save_weights,
)
from exitguard.policy import PolicyFileError  # noqa: E402


def fresh_network(resnet_factory, at=("layer1", "layer2")):
    return attach_exits(resnet_factory(), at=list(at), input_shape=(3, 16, 16)).eval()


def test_weights_round_trip(cnn_network, resnet_factory, images, tmp_path):
    path = save_weights(cnn_network, tmp_path / "network.safetensors")
    other = fresh_network(resnet_factory)
    load_weights(other, path)
    x = images(5)
    torch.testing.assert_close(other.infer(x, 0.4).logits, cnn_network.infer(x, 0.4).logits)
    for name, value in cnn_network.state_dict().items():
        assert torch.equal(value, other.state_dict()[name]), name
    assert path.read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle


def test_loading_into_another_architecture_is_refused(cnn_network, resnet_factory, tmp_path):
    path = save_weights(cnn_network, tmp_path / "network.safetensors")
    with pytest.raises(ValueError, match=r"holds a network with 3 exits; this network has 2"):
        load_weights(fresh_network(resnet_factory, at=["layer1"]), path)
    wider = attach_exits(
        resnet_factory(),
        at=["layer1", "layer2"],
        input_shape=(3, 16, 16),
        head_options={"hidden_features": 4},
    )
    with pytest.raises(ValueError, match=r"architecture fingerprint '[0-9a-f]{16}'; this netw"):
        load_weights(wider, path)


def test_a_foreign_safetensors_file_is_refused(cnn_network, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match=r"is not an exitguard weights file"):
        load_weights(cnn_network, path)


def test_policy_round_trip_records_the_network(cnn_network, make_policy, images, tmp_path):
    path = save_policy(make_policy(0.35), tmp_path / "policy.json", network=cnn_network)
    stored = json.loads(path.read_text())
    assert stored["n_exits"] == 3 and stored["model_fingerprint"] == cnn_network.fingerprint
    assert stored["confidence"] == "max_softmax"
    policy = load_policy(path, network=cnn_network)
    x = images(6)
    assert torch.equal(cnn_network.infer(x, policy).exits, cnn_network.infer(x, 0.35).exits)
    never = load_policy(
        save_policy(make_policy(math.inf), tmp_path / "never.json", network=cnn_network),
        network=cnn_network,
    )
    assert cnn_network.infer(x, never).exits.tolist() == [2] * 6


def test_a_policy_for_another_network_is_refused(
    cnn_network, resnet_factory, make_policy, tmp_path
):
    path = save_policy(make_policy(0.35), tmp_path / "policy.json", network=cnn_network)
    with pytest.raises(
        ValueError,
        match=r"policy.json: `policy` was calibrated for a network "
        r"with 3 exits; this network has 2\.",
    ):
        load_policy(path, network=fresh_network(resnet_factory, at=["layer1"]))
    cnn_network.confidence = "entropy"
    with pytest.raises(ValueError, match=r"thresholds the confidence measure 'max_softmax'"):
        load_policy(path, network=cnn_network)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(PolicyFileError):
        load_policy(tmp_path / "bad.json", network=cnn_network)


def test_io_type_errors(make_policy, tmp_path):
    with pytest.raises(TypeError, match=r"`network` must be an EarlyExitNetwork; got Linear"):
        save_weights(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match=r"`network` must be an EarlyExitNetwork; got NoneType"):
        save_policy(make_policy(0.5), tmp_path / "p.json", network=None)


def test_weights_files_get_the_usual_mode(tmp_path):
    import os
    import stat

    import torch

    from exitguard.nn import EarlyExitNetwork, save_weights

    network = EarlyExitNetwork(
        [torch.nn.Linear(2, 3), torch.nn.Linear(3, 3)], [torch.nn.Linear(3, 3)]
    )
    path = save_weights(network, tmp_path / "w.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
