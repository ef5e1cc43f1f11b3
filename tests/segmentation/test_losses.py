"""Segmentation losses against direct computations, and their tables."""

import math

import numpy as np
import pytest
import torch

from exitguard.tasks.segmentation import (
    GRID_STEP,
    LOSS_BOUNDS,
    SEGMENTATION_RISKS,
    SegmentationOutputs,
    mean_iou,
    mean_pixel_brier,
    miscoverage,
    per_exit_losses,
    sample_pixel_labels,
    segmentation_tables,
)


def random_probs(generator, batch=3, exits=4, classes=5, size=6):
    logits = torch.randn(batch, exits, classes, size, size, generator=generator) * 3
    return logits.softmax(dim=2).double()


def direct_miou(prediction, truth):
    ious = []
    for c in range(max(prediction.max(), truth.max()) + 1):
        union = np.logical_or(prediction == c, truth == c).sum()
        if union == 0:
            continue  # absent from both: no IoU
        ious.append(np.logical_and(prediction == c, truth == c).sum() / union)
    return float(np.mean(ious))


def test_miou_leaves_out_classes_absent_from_both():
    truth = torch.tensor([[[0, 0, 1, 1]]])  # (1, 1, 4)
    prediction = torch.tensor([[[[0, 0, 1, 2]]]])  # (1, 1, 1, 4)
    # class 0: IoU 1; class 1: 1/2; class 2: 0/1; classes 3..9: absent from both, left out.
    value = mean_iou(prediction, truth, num_classes=10)
    assert value.shape == (1, 1)
    assert value.item() == pytest.approx((1 + 0.5 + 0) / 3)
    perfect = mean_iou(truth.unsqueeze(1), truth, num_classes=10)
    assert perfect.item() == 1.0


def test_miou_and_miscoverage_against_loops():
    generator = torch.Generator().manual_seed(0)
    probs = random_probs(generator)
    masks = torch.randint(0, 5, (3, 6, 6), generator=generator)
    predictions = probs.argmax(dim=2)
    miou = mean_iou(predictions, masks, num_classes=5).numpy()
    cover = miscoverage(predictions).numpy()
    for b in range(3):
        for e in range(4):
            p, t = predictions[b, e].numpy(), masks[b].numpy()
            assert miou[b, e] == pytest.approx(direct_miou(p, t))
            assert cover[b, e] == pytest.approx(np.mean(p != predictions[b, -1].numpy()))
    assert np.all(cover[:, -1] == 0)


def test_mean_pixel_brier_against_the_formula_and_its_range():
    generator = torch.Generator().manual_seed(1)
    probs = random_probs(generator)
    labels = torch.randint(0, 5, (3, 6, 6), generator=generator)
    value = mean_pixel_brier(probs, labels).numpy()
    onehot = torch.nn.functional.one_hot(labels, 5).permute(0, 3, 1, 2).unsqueeze(1).double()
    direct = ((probs - onehot) ** 2).sum(dim=2).mean(dim=(-2, -1)).numpy()
    np.testing.assert_allclose(value, direct, rtol=1e-12)
    assert value.min() >= 0 and value.max() <= 2
    certain = torch.nn.functional.one_hot(labels, 5).permute(0, 3, 1, 2).unsqueeze(1).double()
    assert mean_pixel_brier(certain, labels).abs().max() == 0
    wrong = (labels + 1) % 5
    assert torch.allclose(mean_pixel_brier(certain, wrong), torch.full((3, 1), 2.0).double())


def test_pixel_labels_by_inverse_cdf():
    probs = torch.tensor([0.2, 0.5, 0.3]).view(1, 3, 1, 1).expand(1, 3, 1, 5).double()
    uniform = torch.tensor([0.0, 0.19, 0.21, 0.69, 0.71]).view(1, 1, 5).double()
    np.testing.assert_array_equal(sample_pixel_labels(probs, uniform)[0, 0], [0, 0, 1, 1, 2])
    rng = torch.Generator().manual_seed(0)
    many = torch.rand(1, 200, 200, generator=rng, dtype=torch.float64)
    labels = sample_pixel_labels(probs[..., :1].expand(1, 3, 200, 200), many)
    frequencies = torch.bincount(labels.flatten(), minlength=3) / labels.numel()
    np.testing.assert_allclose(frequencies, [0.2, 0.5, 0.3], atol=0.01)


def test_per_exit_losses_bounds_and_the_last_exit():
    generator = torch.Generator().manual_seed(2)
    probs = random_probs(generator).float()
    masks = torch.randint(0, 5, (3, 6, 6), generator=generator)
    uniform = torch.rand(3, 6, 6, generator=generator, dtype=torch.float64)
    losses = per_exit_losses(probs, masks, uniform, num_classes=5)
    assert set(losses) == set(SEGMENTATION_RISKS)
    for risk, value in losses.items():
        assert value.shape == (3, 4)
        assert value.min() >= 0 and value.max() <= LOSS_BOUNDS[risk], risk
    assert torch.all(losses["prediction_consistency"][:, -1] == 0)


def test_tables_row_zero_is_loss_free_and_charged_the_backbone():
    rng = np.random.default_rng(0)
    n, n_exits = 50, 4
    conf = np.sort(rng.random((n, n_exits)), axis=1)
    absolute = {risk: rng.random((n, n_exits)) * LOSS_BOUNDS[risk] for risk in SEGMENTATION_RISKS}
    outputs = SegmentationOutputs(
        confidences={"m": conf}, losses=absolute, pixel_accuracy=conf, miou=conf
    )
    flops = np.array([1.0, 2.0, 3.0, 4.5])
    tables = segmentation_tables(
        outputs, risk="distribution_gap", measure="m", exit_flops=flops, full_flops=4.0
    )
    assert tables["thresholds"][0] == math.inf and len(tables["thresholds"]) == 502
    assert np.all(tables["losses"][0] == 0)
    assert np.all(tables["cost"][0] == 4.0) and np.all(tables["exits"][0] == n_exits - 1)
    k, i = 300, 7
    exit_ = tables["exits"][k, i]
    assert tables["losses"][k, i] == pytest.approx(
        absolute["distribution_gap"][i, exit_] - absolute["distribution_gap"][i, -1]
    )
    assert tables["cost"][k, i] == flops[exit_]
    # The grid is the core's default grid at the segmentation step (checked there).
    from exitguard.risk.exits import default_thresholds

    np.testing.assert_array_equal(tables["thresholds"], default_thresholds(GRID_STEP))
    with pytest.raises(ValueError, match="`risk` must be one of"):
        segmentation_tables(outputs, risk="x", measure="m", exit_flops=flops, full_flops=4.0)
    with pytest.raises(ValueError, match="`measure` must be one of"):
        segmentation_tables(
            outputs, risk="distribution_gap", measure="x", exit_flops=flops, full_flops=4.0
        )


def test_collection_does_not_depend_on_the_batch_size():
    from exitguard.data.images import load_dataset
    from exitguard.data.scenes import make_scenes
    from exitguard.tasks.segmentation import (
        SegmenterConfig,
        build_segmenter,
        collect_segmentation,
        confidence_measures,
    )

    scenes = make_scenes(load_dataset("digits"), n=20, size=16, seed=0)
    torch.manual_seed(0)
    network = build_segmenter(SegmenterConfig(), image_shape=(1, 16, 16), num_classes=11)
    measures = confidence_measures(window=4)
    a = collect_segmentation(network, scenes, measures=measures, batch_size=7, seed=1)
    b = collect_segmentation(network, scenes, measures=measures, batch_size=20, seed=1)
    c = collect_segmentation(network, scenes, measures=measures, batch_size=20, seed=2)
    for risk in SEGMENTATION_RISKS:
        np.testing.assert_allclose(a.losses[risk], b.losses[risk], atol=1e-5)
    for name in a.confidences:
        np.testing.assert_allclose(a.confidences[name], b.confidences[name], atol=1e-5)
    assert a.confidences[measures[0].__name__].shape == (20, 4)
    # the seed only moves the pseudo-labels of the consistency risk
    assert not np.allclose(
        a.losses["distribution_consistency"], c.losses["distribution_consistency"]
    )
    np.testing.assert_allclose(
        a.losses["distribution_gap"], c.losses["distribution_gap"], atol=1e-5
    )
