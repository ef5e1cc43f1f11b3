import numpy as np
import pytest

from exitguard import Risk, build_table
from exitguard.risk.confidence import max_softmax
from exitguard.risk.exits import exit_indices
from exitguard.risk.losses import get_risk, loss_table, per_exit_losses, sample_full_model_labels


def _brier(p, y):
    return sum((p[c] - (1.0 if c == y else 0.0)) ** 2 for c in range(len(p)))


def reference_table(probs, labels, grid, risk, pseudo=None):
    """Slow per-sample oracle of the paper's four relative losses."""
    conf = max_softmax(probs)
    exits = exit_indices(conf, grid)
    n, n_exits, _ = probs.shape
    out = np.zeros(exits.shape)
    for k in range(exits.shape[0]):
        for i in range(n):
            e, last = probs[i, exits[k, i]], probs[i, n_exits - 1]
            if risk == "prediction_gap":
                out[k, i] = float(e.argmax() != labels[i]) - float(last.argmax() != labels[i])
            elif risk == "prediction_consistency":
                out[k, i] = float(e.argmax() != last.argmax())
            elif risk == "distribution_gap":
                out[k, i] = _brier(e, labels[i]) - _brier(last, labels[i])
            else:
                out[k, i] = _brier(e, pseudo[i]) - _brier(last, pseudo[i])
    return out


@pytest.fixture
def outputs(rng):
    probs = rng.dirichlet(np.full(4, 0.5), size=(60, 3))  # (n, L, C)
    labels = rng.integers(0, 4, size=60)
    return probs, labels


@pytest.mark.parametrize(
    "risk",
    ["prediction_gap", "prediction_consistency", "distribution_gap", "distribution_consistency"],
)
def test_four_risks_match_reference(outputs, risk):
    probs, labels = outputs
    grid = np.array([np.inf, 0.9, 0.6, 0.4, 0.0])
    pseudo = sample_full_model_labels(probs, np.random.default_rng(5))
    table = build_table(probs, labels, risk=risk, thresholds=grid, rng=5)["losses"]
    expected = reference_table(probs, labels, grid, risk, pseudo=pseudo)
    np.testing.assert_allclose(table, expected, atol=1e-12)
    bound = get_risk(risk).loss_bound
    assert np.abs(table).max() <= bound
    np.testing.assert_array_equal(table[0], 0.0)


def test_losses_are_signed_unless_clipped(outputs):
    probs, labels = outputs
    table = build_table(probs, labels, risk="distribution_gap")["losses"]
    assert table.min() < 0  # overthinking: some early exits beat the full model
    clipped = build_table(probs, labels, risk="distribution_gap", clip=True)["losses"]
    np.testing.assert_array_equal(clipped, np.maximum(table, 0))


def test_argmax_consistency_label(outputs):
    probs, _ = outputs
    table = build_table(probs, risk="distribution_consistency", consistency_label="argmax")
    pseudo = probs[:, -1].argmax(-1)
    expected = reference_table(probs, None, table["thresholds"], "other", pseudo=pseudo)
    np.testing.assert_allclose(table["losses"], expected, atol=1e-12)


def test_sampled_labels_follow_the_full_model():
    probs = np.tile(np.array([0.2, 0.5, 0.3]), (20000, 2, 1))
    labels = sample_full_model_labels(probs, np.random.default_rng(0))
    freq = np.bincount(labels, minlength=3) / len(labels)
    np.testing.assert_allclose(freq, [0.2, 0.5, 0.3], atol=0.015)  # ~4 standard errors


def test_brier_range_extremes():
    probs = np.array([[[1.0, 0.0], [0.0, 1.0]]])
    per_exit = per_exit_losses(probs, np.array([1]), get_risk("distribution_gap"))
    np.testing.assert_allclose(per_exit, [[2.0, 0.0]])


def test_loss_table_by_hand():
    per_exit = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    exits = np.array([[2, 2], [0, 1], [0, 0]])
    np.testing.assert_array_equal(loss_table(per_exit, exits), [[0, 0], [1, 0], [1, -1]])


def test_custom_risk():
    def squared(probs, labels):
        return (probs[..., 0] - 0.5) ** 2

    risk = Risk("squared", squared, loss_bound=0.25, needs_labels=False)
    probs = np.full((5, 2, 2), 0.5)
    probs[:, 0] = [1.0, 0.0]
    table = build_table(probs, risk=risk, thresholds=[0.9])
    np.testing.assert_allclose(table["losses"], [[0] * 5, [0.25] * 5])


def test_labels_are_checked(outputs):
    probs, labels = outputs
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 3\]"):
        build_table(probs, labels + 1)
    with pytest.raises(ValueError, match=r"`labels` must have shape \(60,\)"):
        build_table(probs, labels[:-1])
    with pytest.raises(ValueError, match="`labels` are required"):
        build_table(probs, risk="prediction_gap")
    with pytest.raises(ValueError, match="`risk` must be one of"):
        build_table(probs, labels, risk="accuracy")


def test_bad_custom_risk_range():
    risk = Risk("bad", lambda p, y: p[..., 0] * 3, loss_bound=1.0, needs_labels=False)
    with pytest.raises(ValueError, match=r"absolute losses in \[0, loss_bound\]"):
        build_table(np.full((3, 2, 2), 0.5), risk=risk)


def test_logits_are_accepted(outputs):
    probs, labels = outputs
    logits = np.log(probs)
    a = build_table(logits, labels, from_logits=True)["losses"]
    b = build_table(probs, labels)["losses"]
    np.testing.assert_allclose(a, b)
