"""Model payloads without Ray: rebuilt on a worker, optionally BatchNorm-folded like the driver."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from exitguard.distributed.models import ModelPayload, classifier_payload  # noqa: E402
from exitguard.nn import optimize_for_inference  # noqa: E402
from exitguard.tasks.classification import CNNConfig, build_classifier  # noqa: E402


@pytest.fixture
def network():
    torch.manual_seed(0)
    net = build_classifier(
        CNNConfig(widths=(8, 12, 16), strides=(1, 2, 1)), image_shape=(1, 12, 12)
    )
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.mark.parametrize("optimize", [False, True])
def test_a_worker_computes_what_the_driver_serves(network, optimize):
    config = CNNConfig(widths=(8, 12, 16), strides=(1, 2, 1))
    payload = classifier_payload(network, config, image_shape=(1, 12, 12), optimize=optimize)
    built = payload.light().build(weights=payload.weights)
    served = optimize_for_inference(network)[0] if optimize else network
    x = torch.rand(16, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert torch.equal(built(x), served(x))  # bit for bit: the same rewrite of the same weights
    assert payload.describe()["optimize"] is optimize


def test_optimize_needs_an_early_exit_network():
    payload = ModelPayload.of(
        torch.nn.Linear(2, 2),
        factory="torch.nn:Linear",
        arguments={"in_features": 2, "out_features": 2},
        optimize=True,
    )
    with pytest.raises(
        ValueError, match=r"`optimize` needs an EarlyExitNetwork; .* built a Linear"
    ):
        payload.build()
