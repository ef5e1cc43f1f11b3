"""collect: per-exit outputs for the risk core, and the round trip through calibration."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from exitguard.nn import ExitOutputs, collect, count_flops  # noqa: E402
from exitguard.risk import confidence as numpy_conf  # noqa: E402
from exitguard.risk.exits import exit_index  # noqa: E402


def test_collect_shapes_and_agreement_with_infer(cnn_network, images):
    x = images(50, seed=31)
    labels = np.arange(50) % 5
    outputs = collect(cnn_network, x, labels=labels, batch_size=16)
    assert outputs.logits.shape == (50, 3, 5) and outputs.probs.dtype == np.float64
    assert outputs.confidences.shape == (50, 3) and outputs.labels.tolist() == labels.tolist()
    assert repr(outputs).startswith("ExitOutputs(n=50, n_exits=3, logits=(50, 3, 5)")
    # The numpy reference on the collected probabilities gives the same confidences.
    reference = numpy_conf.confidences(outputs.probs, measure="max_softmax")
    assert np.array_equal(reference, outputs.confidences)
    full = cnn_network.infer(x, float("inf"))
    np.testing.assert_allclose(outputs.probs[:, -1], full.probs.numpy(), rtol=0, atol=1e-6)


def test_collect_from_a_loader_and_save_as_npz(cnn_network, images, tmp_path):
    x = images(20)
    y = torch.arange(20) % 5
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    outputs = collect(cnn_network, loader)
    assert outputs.n == 20 and outputs.labels.tolist() == y.tolist()
    loaded = ExitOutputs.load(outputs.save(tmp_path / "exits.npz"))
    assert np.array_equal(loaded.probs, outputs.probs) and loaded.measure == "max_softmax"
    unlabelled = collect(cnn_network, [x[:4], x[4:]])
    assert unlabelled.labels is None and unlabelled.n == 20


def test_calibrated_policy_runs_on_the_network(cnn_network, images):
    calibration = pytest.importorskip("exitguard.calibration")
    x = images(400, seed=32)
    labels = cnn_network.infer(x, float("inf")).predictions.numpy()  # consistency labels
    outputs = collect(cnn_network, x, labels=labels)
    flops = count_flops(cnn_network)
    policy = calibration.calibrate(
        outputs.probs, outputs.labels, target_risk=0.3, delta=0.1, exit_cost=flops.to_exit
    )
    policy = cnn_network.bind_policy(policy)
    result = cnn_network.infer(x, policy)
    threshold = policy.threshold if not policy.is_full_model else float("inf")
    assert np.array_equal(result.exits.numpy(), exit_index(outputs.confidences, threshold))
    assert policy.expected_cost == pytest.approx(flops.expected(result.exits.numpy()))


def test_collect_errors(cnn_network, images):
    with pytest.raises(ValueError, match=r"`batch_size` must be a positive integer; got 0"):
        collect(cnn_network, images(2), batch_size=0)
    with pytest.raises(TypeError, match=r"`data` must be a tensor of samples or an iterable"):
        collect(cnn_network, 3)
    with pytest.raises(ValueError, match=r"either every batch of `data` must carry labels"):
        collect(cnn_network, [images(2), (images(2), torch.zeros(2, dtype=torch.long))])
    with pytest.raises(TypeError, match=r"`labels` must hold integer class indices"):
        collect(cnn_network, images(2), labels=[0.5, 1.0])
