"""The torch confidence measures agree with the numpy reference of the risk core."""

from __future__ import annotations

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra.numpy import arrays  # noqa: E402

from exitguard.nn import confidence as torch_conf  # noqa: E402
from exitguard.risk import confidence as numpy_conf  # noqa: E402

MEASURES = ["max_softmax", "margin", "entropy", "patience"]


def random_probs(n: int, n_exits: int, n_classes: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=(n, n_exits, n_classes))
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return probs / probs.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("n_classes", [1, 2, 10])
def test_torch_measures_agree_with_numpy(measure, n_classes):
    probs = random_probs(200, 4, n_classes, seed=n_classes)
    expected = numpy_conf.confidences(probs, measure=measure)
    got = torch_conf.confidences(torch.from_numpy(probs), measure=measure).numpy()
    # Same float64 inputs: equal up to summation order (entropy) or exactly.
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    if measure != "entropy":
        assert np.array_equal(got, expected)


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.float64, (5, 3, 4), elements=st.floats(0, 1, allow_nan=False)),
    st.sampled_from(MEASURES),
)
def test_agreement_on_arbitrary_probabilities(raw, measure):
    probs = (raw + 1e-3) / (raw + 1e-3).sum(axis=-1, keepdims=True)  # ties and zeros welcome
    expected = numpy_conf.confidences(probs, measure=measure)
    got = torch_conf.confidences(torch.from_numpy(probs), measure=measure).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_patience_with_other_k_agrees(k):
    probs = random_probs(100, 6, 3, seed=k)
    expected = numpy_conf.patience(probs, k=k)
    got = torch_conf.patience(torch.from_numpy(probs), k=k).numpy()
    assert np.array_equal(got, expected)


def test_patience_by_hand():
    # argmax per exit: 0, 0, 0, 1, 1 -> runs 0, 1, 2, 0, 1 -> with k = 2: 0, .5, 1, 0, .5
    eye = torch.eye(2, dtype=torch.float64)
    probs = eye[[0, 0, 0, 1, 1]].unsqueeze(0)  # (1, 5, 2)
    assert torch_conf.patience(probs).tolist() == [[0.0, 0.5, 1.0, 0.0, 0.5]]


def test_dense_measures_average_over_positions():
    probs = torch.from_numpy(random_probs(6 * 4, 3, 5, seed=1)).reshape(6, 4, 3, 5)
    dense = probs.permute(0, 2, 3, 1).reshape(6, 3, 5, 2, 2)  # (B, L, C, 2, 2)
    for measure in MEASURES:
        per_position = torch_conf.confidences(
            probs.permute(0, 1, 2, 3).reshape(6 * 4, 3, 5), measure=measure
        ).reshape(6, 4, 3)
        expected = per_position.mean(dim=1)  # (6, 3)
        got = torch_conf.confidences(dense, measure=measure)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_names_and_pointwise_flags():
    assert torch_conf.resolve_measure("margin") == ("margin", torch_conf.margin)
    assert torch_conf.measure_name(functools.partial(torch_conf.patience, k=3)) == "patience(k=3)"
    assert torch_conf.is_pointwise(torch_conf.entropy)
    assert not torch_conf.is_pointwise(torch_conf.patience)
    assert not torch_conf.is_pointwise(lambda p: p.amax(dim=2))


def test_errors_name_the_argument():
    probs = torch.full((2, 3, 4), 0.25)
    with pytest.raises(ValueError, match=r"`measure` must be one of 'max_softmax', 'margin'"):
        torch_conf.confidences(probs, measure="top1")
    with pytest.raises(TypeError, match=r"a measure name or a callable .*; got int"):
        torch_conf.confidences(probs, measure=3)
    with pytest.raises(ValueError, match=r"`probs` must have shape \(B, L, C\) .*; got \(3, 4\)\."):
        torch_conf.confidences(probs[0], measure="margin")
    with pytest.raises(ValueError, match=r"must return shape \(2, 3\); got \(2,\)"):
        torch_conf.confidences(probs, measure=lambda p: p[:, 0, 0])
    with pytest.raises(ValueError, match=r"must return finite values in \[0, 1\]"):
        torch_conf.confidences(probs, measure=lambda p: p.sum(dim=2) * 2)
    with pytest.raises(ValueError, match=r"`k` must be a positive integer; got 0"):
        torch_conf.patience(probs, k=0)
