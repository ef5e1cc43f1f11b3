"""EarlyExitNetwork: forward, real early exit versus the offline simulation, policy checks."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from exitguard.nn import EarlyExitNetwork, InferenceResult, attach_exits, patience  # noqa: E402
from exitguard.risk.exits import exit_index  # noqa: E402


def assert_same_outcome(real: InferenceResult, simulated: InferenceResult) -> None:
    # Exits and predictions must agree exactly; confidences and probabilities up to the float
    # noise of running a sample in batches of other sizes (conv kernels differ at batch 1).
    assert torch.equal(real.exits, simulated.exits)
    assert torch.equal(real.predictions, simulated.predictions)
    torch.testing.assert_close(real.confidence, simulated.confidence, rtol=0, atol=1e-6)
    torch.testing.assert_close(real.probs, simulated.probs, rtol=0, atol=1e-6)
    torch.testing.assert_close(real.logits, simulated.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 7, 256])
@pytest.mark.parametrize("model", ["cnn", "vit"])
def test_real_skipping_equals_the_simulation(
    batch, model, cnn_network, vit_network, images, midpoint_thresholds
):
    network = cnn_network if model == "cnn" else vit_network
    x = images(256, seed=3)
    _, conf = network.exit_confidences(x)  # (256, L)
    thresholds = midpoint_thresholds(conf.numpy())
    used = set()
    for threshold in thresholds:
        for start in range(0, 256, batch) if batch < 256 else [0]:
            if batch == 1 and start % 4:
                continue  # every 4th sample is enough at batch 1
            chunk = x[start : start + batch]
            real = network.infer(chunk, threshold)
            assert_same_outcome(real, network.simulate(chunk, threshold))
            used.update(real.exits.tolist())
    assert used == set(range(network.n_exits))  # every exit was taken somewhere


@pytest.mark.parametrize("measure", ["margin", "entropy", "patience"])
def test_real_skipping_equals_the_simulation_for_every_measure(
    measure, cnn_network, images, midpoint_thresholds
):
    cnn_network.confidence = measure
    x = images(64, seed=4)
    _, conf = cnn_network.exit_confidences(x)
    for threshold in [*midpoint_thresholds(conf.numpy(), count=2), 0.0, 0.5, 1.0]:
        real = cnn_network.infer(x, threshold)
        assert_same_outcome(real, cnn_network.simulate(x, threshold))
        for row in (0, 5, 63):  # and one sample at a time
            single = cnn_network.infer(x[row : row + 1], threshold)
            assert single.exits.item() == real.exits[row].item()


def test_simulation_follows_the_risk_cores_exit_rule(cnn_network, images, midpoint_thresholds):
    x = images(128, seed=5)
    _, conf = cnn_network.exit_confidences(x)
    for threshold in [*midpoint_thresholds(conf.numpy()), 0.0, 1.0, math.inf]:
        expected = exit_index(conf.numpy(), threshold)
        assert np.array_equal(cnn_network.simulate(x, threshold).exits.numpy(), expected)
        assert np.array_equal(cnn_network.infer(x, threshold).exits.numpy(), expected)


def test_threshold_is_compared_in_float64_like_the_numpy_rule(cnn_network, images):
    # A float32 confidence just below a float64 threshold that rounds down to it in float32
    # must not fire: torch would compare in float32 unless told otherwise.
    x = images(32, seed=6)
    _, conf = cnn_network.exit_confidences(x)
    value = float(conf[0, 0])  # exactly representable in float32 (it came from float32)
    threshold = np.nextafter(value, 2.0)  # a float64 just above it, same float32
    assert np.float32(threshold) == np.float32(value)
    real = cnn_network.infer(x[:1], float(threshold))
    assert real.exits.item() == exit_index(conf[:1].numpy(), float(threshold)).item()
    assert real.exits.item() != 0


@pytest.mark.parametrize("batch", [1, 7, 256])
@pytest.mark.parametrize("model", ["cnn", "vit"])
def test_never_exit_reproduces_the_backbone(
    batch, model, resnet, vit, cnn_network, vit_network, images
):
    backbone, network = (resnet, cnn_network) if model == "cnn" else (vit, vit_network)
    x = images(batch, seed=7)
    with torch.inference_mode():
        expected = backbone(x)
    result = network.infer(x, math.inf)
    assert (result.logits - expected).abs().max().item() <= 1e-6
    assert result.exits.tolist() == [network.n_exits - 1] * batch
    torch.testing.assert_close(result.probs, expected.softmax(dim=1), rtol=0, atol=1e-6)


def test_never_exit_runs_no_intermediate_head(cnn_network, images):
    calls = []
    hooks = [h.register_forward_hook(lambda *a: calls.append(1)) for h in cnn_network.heads[:-1]]
    cnn_network.infer(images(4), math.inf)
    assert calls == []
    cnn_network.infer(images(4), 1.0)
    assert len(calls) == 2
    for hook in hooks:
        hook.remove()


def test_threshold_zero_exits_everyone_at_the_first_exit(cnn_network, images):
    result = cnn_network.infer(images(9), 0.0)
    assert result.exits.tolist() == [0] * 9
    assert result.exit_counts == [9, 0, 0]


def test_skipping_really_saves_compute(cnn_network, images):
    x = images(16, seed=8)
    with FlopCounterMode(display=False) as full:
        cnn_network.infer(x, math.inf)
    result = cnn_network.infer(x, 0.0)
    with FlopCounterMode(display=False) as early:
        cnn_network.infer(x, 0.0)
    assert result.exit_counts[0] == 16
    assert early.get_total_flops() < 0.5 * full.get_total_flops()


def test_forward_returns_every_exits_logits(cnn_network, images):
    logits = cnn_network(images(6))
    assert logits.shape == (6, 3, 5)


def test_forward_intermediates_normalises_indices(cnn_network, images):
    x = images(2)
    features = cnn_network.forward_intermediates(x, indices=[-1, 0])
    assert [tuple(f.shape) for f in features] == [(2, 8, 16, 16), (2, 5)]
    with pytest.raises(ValueError, match=r"`indices` must lie in \[-3, 2\] \(the network has 3"):
        cnn_network.forward_intermediates(x, indices=[3])


def test_explicit_stages_with_the_backbone_head_in_the_last_stage(images):
    torch.manual_seed(0)
    stages = [
        nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU()),
        nn.Sequential(nn.Linear(16, 16), nn.ReLU()),
        nn.Linear(16, 4),
    ]
    heads = [nn.Linear(16, 4), nn.Linear(16, 4)]
    network = EarlyExitNetwork(stages, heads, input_shape=(3, 2, 2)).eval()
    assert isinstance(network.heads[-1], nn.Identity)
    x = images(50, shape=(3, 2, 2))
    assert network(x).shape == (50, 3, 4)
    for threshold in (0.3, 0.35, 0.4):
        assert_same_outcome(network.infer(x, threshold), network.simulate(x, threshold))


def test_a_single_exit_network_is_the_backbone(images):
    network = EarlyExitNetwork([nn.Flatten()], [nn.Linear(12, 3)], input_shape=(3, 2, 2))
    x = images(5, shape=(3, 2, 2))
    for threshold in (0.0, 0.5, math.inf):
        assert network.infer(x, threshold).exits.tolist() == [0] * 5
        assert network.simulate(x, threshold).exits.tolist() == [0] * 5


def test_dense_outputs_exit_per_image(images):
    from exitguard.nn import DenseHead

    torch.manual_seed(0)
    stages = [
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)),
    ]
    network = EarlyExitNetwork(stages, [DenseHead(8, 4)], input_shape=(3, 8, 8)).eval()
    x = images(40, shape=(3, 8, 8))
    logits, conf = network.exit_confidences(x)
    assert logits.shape == (40, 2, 4, 8, 8) and conf.shape == (40, 2)
    threshold = float(conf[:, 0].median())
    real = network.infer(x, threshold)
    assert real.predictions.shape == (40, 8, 8)
    assert 0 < real.exit_counts[0] < 40
    assert_same_outcome(real, network.simulate(x, threshold))


def test_results_keep_the_input_order(cnn_network, images):
    x = images(30, seed=9)
    _, conf = cnn_network.exit_confidences(x)
    threshold = float(conf[:, 0].median())
    result = cnn_network.infer(x, threshold)
    singles = [cnn_network.infer(x[i : i + 1], threshold).predictions.item() for i in range(30)]
    assert result.predictions.tolist() == singles


def test_a_custom_measure_is_used_and_recorded(cnn_network, images):
    def top1(probs):
        return probs.amax(dim=2)

    top1.pointwise = True
    cnn_network.confidence = top1
    assert cnn_network.confidence == "top1"
    x = images(16)
    assert_same_outcome(cnn_network.infer(x, 0.3), cnn_network.simulate(x, 0.3))
    cnn_network.confidence = functools.partial(patience, k=1)
    assert cnn_network.confidence == "patience(k=1)"
    assert_same_outcome(cnn_network.infer(x, 1.0), cnn_network.simulate(x, 1.0))


def test_a_custom_measure_out_of_range_is_an_error(cnn_network, images):
    cnn_network.confidence = lambda probs: probs.amax(dim=2) * 3
    with pytest.raises(ValueError, match=r"must return values in \[0, 1\]"):
        cnn_network.infer(images(2), 0.5)


def test_infer_accepts_a_policy_and_checks_it_fits(cnn_network, images, make_policy):
    x = images(8)
    policy = cnn_network.bind_policy(make_policy(0.3))
    assert policy.n_exits == 3 and policy.model_fingerprint == cnn_network.fingerprint
    assert torch.equal(cnn_network.infer(x, policy).exits, cnn_network.infer(x, 0.3).exits)
    never = cnn_network.bind_policy(make_policy(math.inf))
    assert cnn_network.infer(x, never).exits.tolist() == [2] * 8

    with pytest.raises(
        ValueError, match=r"calibrated for a network with 4 exits; this network has 3\."
    ):
        cnn_network.infer(x, make_policy(0.3, n_exits=4))
    with pytest.raises(ValueError, match=r"architecture fingerprint 'abc'; this network's is"):
        cnn_network.infer(x, make_policy(0.3, model_fingerprint="abc"))
    with pytest.raises(ValueError, match=r"measure 'entropy'; this network uses 'max_softmax'"):
        cnn_network.infer(x, make_policy(0.3, confidence="entropy"))
    with pytest.raises(ValueError, match=r"selects row 3 of a calibration table without"):
        cnn_network.infer(x, make_policy(None))


@pytest.mark.parametrize(
    ("policy", "error", "message"),
    [
        (-0.1, ValueError, r"`policy` must be a float in \[0, 1\] or inf .*; got -0.1\."),
        (1.5, ValueError, r"`policy` must be a float in \[0, 1\] or inf .*; got 1.5\."),
        (math.nan, ValueError, r"got nan\."),
        ("0.5", TypeError, r"must be an ExitPolicy or a float threshold .*; got str\."),
        (True, TypeError, r"got bool\."),
    ],
)
def test_bad_policies_are_rejected(cnn_network, images, policy, error, message):
    with pytest.raises(error, match=message):
        cnn_network.infer(images(2), policy)


def test_wrong_input_shapes_are_rejected(cnn_network, images):
    with pytest.raises(
        ValueError, match=r"`x` must have shape \(B, 3, 16, 16\) for this network; got \(2, 3, 8,"
    ):
        cnn_network.infer(images(2, shape=(3, 8, 8)), 0.5)
    with pytest.raises(ValueError, match=r"got \(3, 16, 16\)"):
        cnn_network.infer(images(1)[0], 0.5)
    with pytest.raises(ValueError, match=r"B >= 1 samples; got shape \(0, 3, 16, 16\)"):
        cnn_network.infer(images(1)[:0], 0.5)
    with pytest.raises(TypeError, match=r"`x` must be a torch.Tensor; got ndarray"):
        cnn_network.infer(np.zeros((1, 3, 16, 16)), 0.5)
    cnn_network.input_shape = (3, None, None)  # any resolution
    assert cnn_network.infer(images(2, shape=(3, 8, 8)), 0.5).exits.shape == (2,)


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"`stages` must hold at least one module"):
        EarlyExitNetwork([], [])
    with pytest.raises(
        TypeError, match=r"`stages\[1\]` must be an nn.Module; got builtin_function_or_method\."
    ):
        EarlyExitNetwork([nn.Identity(), torch.relu], [nn.Identity()])
    with pytest.raises(ValueError, match=r"one module per stage \(2\), or one fewer .*; got 3"):
        EarlyExitNetwork([nn.Identity()] * 2, [nn.Identity()] * 3)
    with pytest.raises(ValueError, match=r"`confidence` must be one of 'max_softmax'"):
        EarlyExitNetwork([nn.Identity()], [], confidence="softmax")


def test_mismatched_exit_shapes_are_reported(images):
    network = EarlyExitNetwork([nn.Flatten(), nn.Linear(12, 3)], [nn.Linear(12, 4)])
    with pytest.raises(ValueError, match=r"same shape; got \(2, 4\), \(2, 3\)"):
        network(images(2, shape=(3, 2, 2)))


def test_result_repr_is_readable(cnn_network, images):
    text = repr(cnn_network.infer(images(4), 0.0))
    assert text == (
        "InferenceResult(batch=4, n_exits=3, exit_counts=[4, 0, 0], threshold=0, "
        "measure='max_softmax')"
    )


def test_attach_keeps_the_fingerprint_stable(resnet):
    first = attach_exits(resnet, at=["layer1", "layer2"], input_shape=(3, 16, 16))
    second = attach_exits(resnet, at=["layer1", "layer2"], input_shape=(3, 16, 16))
    other = attach_exits(resnet, at=["layer1"], input_shape=(3, 16, 16))
    assert first.fingerprint == second.fingerprint != other.fingerprint
    assert second.double().fingerprint == first.fingerprint  # dtype is not architecture


def test_fingerprint_follows_architecture_changes(cnn_network):
    before = cnn_network.fingerprint
    assert cnn_network.fingerprint == before  # cached
    cnn_network.heads[0].reset(5)  # same shape: same architecture
    assert cnn_network.fingerprint == before
    cnn_network.heads[0].reset(7)
    assert cnn_network.fingerprint != before
