"""optimize_for_inference: BatchNorm folded and channels-last, with the same exit outputs."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from exitguard.nn.optimize import optimize_for_inference  # noqa: E402


def _random_statistics(network, seed=0):
    """BatchNorm statistics and affine parameters away from (0, 1), so folding matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.3)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(1 + 0.3 * torch.randn(n, generator=generator))
                module.bias.copy_(0.3 * torch.randn(n, generator=generator))
    return network.eval()


@pytest.fixture(params=["classifier", "segmenter"])
def network_and_input(request):
    torch.manual_seed(0)
    if request.param == "classifier":
        from exitguard.tasks.classification import CNNConfig, build_classifier

        network = build_classifier(
            CNNConfig(widths=(8, 12, 16), strides=(1, 2, 1)), image_shape=(1, 12, 12)
        )
        x = torch.rand(32, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    else:
        from exitguard.tasks.segmentation import SegmenterConfig, build_segmenter

        config = SegmenterConfig(widths=(8, 12, 12), strides=(2, 1, 1), dilations=(1, 1, 2))
        network = build_segmenter(config, image_shape=(1, 16, 16), num_classes=4)
        x = torch.rand(32, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    return _random_statistics(network), x


@pytest.mark.parametrize("channels_last", [False, True])
def test_same_exit_outputs_and_exits(network_and_input, channels_last):
    network, x = network_and_input
    optimised, report = optimize_for_inference(network, channels_last=channels_last)
    assert len(report.folded) == network.n_exits and report.kept == ()
    assert report.channels_last is channels_last
    assert not any(isinstance(m, nn.BatchNorm2d) for m in optimised.stages.modules())
    with torch.inference_mode():
        expected, got = network(x), optimised(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    _, conf = network.exit_confidences(x)
    ordered = conf[:, 0].sort().values
    gaps = ordered[1:] - ordered[:-1]
    k = int(gaps.argmax())  # a threshold far from every confidence: rounding cannot flip it
    threshold = float(ordered[k] + ordered[k + 1]) / 2
    real, reference = optimised.infer(x, threshold), network.infer(x, threshold)
    assert torch.equal(real.exits, reference.exits)
    torch.testing.assert_close(real.logits, reference.logits, rtol=1e-4, atol=1e-5)
    assert optimised.confidence == network.confidence
    assert optimised.input_shape == network.input_shape


def test_the_given_network_is_not_changed(network_and_input):
    network, _ = network_and_input
    before = {k: v.clone() for k, v in network.state_dict().items()}
    optimize_for_inference(network, channels_last=True)
    after = network.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(isinstance(m, nn.BatchNorm2d) for m in network.modules())


class Untraceable(nn.Module):
    """Control flow on a tensor's value: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        out = self.bn(self.conv(x))
        return out if bool(out.sum() > -1e9) else -out


def test_an_untraceable_stage_is_kept_and_named(images):
    from exitguard.nn import EarlyExitNetwork

    stages = [Untraceable(), nn.Sequential(nn.Flatten(), nn.Linear(4 * 16 * 16, 5))]
    heads = [nn.Sequential(nn.Flatten(), nn.Linear(4 * 16 * 16, 5))]
    network = _random_statistics(EarlyExitNetwork(stages, heads, input_shape=(3, 16, 16)))
    optimised, report = optimize_for_inference(network)
    assert report.folded == () and report.kept[0].startswith("stages.0 (")
    x = images(8)
    with torch.inference_mode():
        torch.testing.assert_close(optimised(x), network(x))


def test_bad_arguments():
    with pytest.raises(TypeError, match="`network` must be an EarlyExitNetwork; got Linear"):
        optimize_for_inference(nn.Linear(2, 2))
    from exitguard.nn import EarlyExitNetwork

    network = EarlyExitNetwork([nn.Linear(2, 2)], [])
    with pytest.raises(TypeError, match="`channels_last` must be True or False; got 'yes'"):
        optimize_for_inference(network, channels_last="yes")
