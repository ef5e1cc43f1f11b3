"""Image-level confidences of dense outputs: per-pixel measures and their aggregation."""

import math

import numpy as np
import pytest
import torch

from exitguard.nn import EarlyExitNetwork
from exitguard.nn.confidence import (
    DenseConfidence,
    aggregate,
    is_pointwise,
    measure_name,
    pixel_entropy,
    pixel_margin,
    pixel_max_softmax,
)
from exitguard.tasks.segmentation import SegmenterConfig, build_segmenter, confidence_measures


def test_aggregations_by_hand():
    scores = torch.tensor(
        [[0.9, 0.9, 0.1, 0.1], [0.9, 0.9, 0.1, 0.1], [0.5, 0.5, 0.8, 0.8], [0.5, 0.5, 0.8, 0.8]]
    ).view(1, 1, 4, 4)
    assert aggregate(scores, aggregation="mean").item() == pytest.approx(0.575)
    # sorted: 0.1 x4, 0.5 x4, 0.8 x4, 0.9 x4; the 0.25-quantile at position 3.75 -> 0.1 + 0.75*0.4
    assert aggregate(scores, aggregation="quantile", q=0.25).item() == pytest.approx(0.4)
    # 2x2 windows (stride 1): the top-right one averages 0.1
    assert aggregate(scores, aggregation="patch", window=2).item() == pytest.approx(0.1)
    # 3x3 windows: the minimum is over four windows, checked by a loop
    windows = [scores[0, 0, i : i + 3, j : j + 3].mean().item() for i in range(2) for j in range(2)]
    assert aggregate(scores, aggregation="patch", window=3).item() == pytest.approx(min(windows))
    # a window larger than the image is the image
    assert aggregate(scores, aggregation="patch", window=99).item() == pytest.approx(0.575)


def test_quantile_matches_numpy_on_random_maps():
    rng = np.random.default_rng(0)
    scores = rng.random((3, 2, 5, 7))
    for q in (0.0, 0.1, 0.25, 0.5, 1.0):
        got = aggregate(torch.from_numpy(scores), aggregation="quantile", q=q).numpy()
        np.testing.assert_allclose(got, np.quantile(scores.reshape(3, 2, -1), q, axis=-1))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"aggregation": "max"}, "`aggregation` must be one of 'mean', 'quantile', 'patch'; got"),
        ({"aggregation": "quantile", "q": 1.5}, r"`q` must lie in \[0, 1\]; got 1.5"),
        ({"aggregation": "patch", "window": 0}, "`window` must be a positive integer; got 0"),
    ],
)
def test_bad_aggregation_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        aggregate(torch.zeros(1, 1, 2, 2), **kwargs)


def test_pixel_measures_by_hand():
    probs = torch.tensor([0.7, 0.2, 0.1]).view(1, 1, 3, 1, 1).double()
    assert pixel_max_softmax(probs).item() == pytest.approx(0.7)
    assert pixel_margin(probs).item() == pytest.approx(0.5)
    entropy = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    assert pixel_entropy(probs).item() == pytest.approx(1 - entropy / math.log(3))


def test_dense_confidence_names_and_checks():
    measures = confidence_measures(q=0.1, window=8)
    assert [measure_name(m) for m in measures] == [
        f"{pixel}/{agg}"
        for pixel in ("max_softmax", "margin", "entropy")
        for agg in ("mean", "quantile(q=0.1)", "patch(window=8)")
    ]
    assert all(is_pointwise(m) for m in measures)
    with pytest.raises(ValueError, match="`pixel` must be one of 'max_softmax', 'margin'"):
        DenseConfidence("top3")
    with pytest.raises(ValueError, match=r"needs probabilities \(B, L, C, H, W\)"):
        DenseConfidence()(torch.ones(2, 3, 4))


@pytest.mark.parametrize(
    "measure",
    [
        DenseConfidence("max_softmax", "mean"),
        DenseConfidence("margin", "quantile", q=0.25),
        DenseConfidence("entropy", "patch", window=4),
    ],
    ids=measure_name,
)
def test_real_image_level_exits_equal_simulated_exits(measure):
    torch.manual_seed(0)
    network = build_segmenter(SegmenterConfig(), image_shape=(1, 16, 16), num_classes=4).eval()
    network.confidence = measure
    x = torch.rand(24, 1, 16, 16)
    _, conf = network.exit_confidences(x)  # (B, L)
    threshold = float(conf[:, 0].median())  # about half the batch leaves at the first exit
    real = network.infer(x, threshold)
    simulated = network.simulate(x, threshold)
    torch.testing.assert_close(real.exits, simulated.exits)
    assert 0 < int((real.exits == 0).sum()) < 24  # compaction really happened
    torch.testing.assert_close(real.probs, simulated.probs, atol=1e-5, rtol=1e-4)
    assert real.predictions.shape == (24, 16, 16)
    never = network.infer(x, math.inf)
    assert torch.all(never.exits == network.n_exits - 1)
    assert isinstance(network, EarlyExitNetwork) and network.confidence == measure_name(measure)
