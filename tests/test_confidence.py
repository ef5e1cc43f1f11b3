import numpy as np
import pytest

from exitguard.risk.confidence import confidences, entropy, margin, max_softmax, patience


def test_measures_by_hand():
    probs = np.array([[[0.7, 0.2, 0.1], [0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]]])
    np.testing.assert_allclose(max_softmax(probs), [[0.7, 0.5, 1 / 3]])
    np.testing.assert_allclose(margin(probs), [[0.5, 0.0, 0.0]], atol=1e-15)
    h = -(0.7 * np.log(0.7) + 0.2 * np.log(0.2) + 0.1 * np.log(0.1)) / np.log(3)
    np.testing.assert_allclose(
        entropy(probs), [[1 - h, 1 - np.log(2) / np.log(3), 0.0]], atol=1e-12
    )


def test_patience_counts_agreeing_exits():
    # argmax per exit: 0, 0, 1, 1, 1
    probs = np.eye(2)[[0, 0, 1, 1, 1]][None]
    np.testing.assert_allclose(patience(probs, k=2), [[0, 0.5, 0, 0.5, 1.0]])
    np.testing.assert_allclose(patience(probs, k=1), [[0, 1, 0, 1, 1]])


@pytest.mark.parametrize("measure", ["max_softmax", "margin", "entropy", "patience"])
def test_range(measure, rng):
    probs = rng.dirichlet(np.full(10, 0.3), size=(40, 4))
    scores = confidences(probs, measure=measure)
    assert scores.shape == (40, 4)
    assert scores.min() >= 0 and scores.max() <= 1


def test_off_simplex_is_rejected():
    with pytest.raises(ValueError, match="must sum to 1 over classes"):
        confidences(np.full((2, 2, 3), 0.5))
    with pytest.raises(ValueError, match="`measure` must be one of"):
        confidences(np.full((2, 2, 2), 0.5), measure="nope")


def test_custom_measure_is_checked():
    with pytest.raises(ValueError, match=r"must return values in \[0, 1\]"):
        confidences(np.full((2, 2, 2), 0.5), measure=lambda p: p.sum(-1) * 2)
