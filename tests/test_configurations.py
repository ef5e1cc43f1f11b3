"""Configurations: the vector exit rule, the (R, K, n) table, threshold families, tail risks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from exitguard import build_table
from exitguard.risk.configurations import (
    ThresholdFamily,
    evaluate_vectors,
    family_table,
    scalar_vectors,
    vector_exit_indices,
)
from exitguard.risk.exits import default_thresholds, exit_indices
from exitguard.risk.tail import exceedance_losses, exceedance_per_exit
from tests.conftest import loop_exits


def test_vector_exit_rule_matches_a_loop(rng):
    conf = np.round(rng.random((60, 5)), 1)  # coarse values: many ties with the thresholds
    vectors = np.round(rng.random((40, 4)), 1)
    vectors[rng.random(vectors.shape) < 0.25] = math.inf
    vectors[0] = math.inf  # the full model
    vectors[1] = 0.0  # everyone leaves at the first exit
    exits = vector_exit_indices(conf, vectors)
    np.testing.assert_array_equal(exits, loop_exits(conf, vectors))
    assert np.all(exits[0] == 4) and np.all(exits[1] == 0)


def test_scalar_vectors_are_the_scalar_grid(rng):
    probs = rng.dirichlet(np.ones(6) * 0.3, size=(80, 4))  # (n, L, C)
    labels = rng.integers(0, 6, 80)
    grid = default_thresholds(0.05)
    tables = build_table(probs, labels, risk="prediction_gap", thresholds=grid)
    conf = probs.max(axis=-1)
    vectors = scalar_vectors(grid, 4)
    np.testing.assert_array_equal(vector_exit_indices(conf, vectors), exit_indices(conf, grid))
    per_exit = (probs.argmax(-1) != labels[:, None]).astype(float)
    table = evaluate_vectors(conf, per_exit, vectors)
    np.testing.assert_array_equal(table.losses[0], tables["losses"])
    np.testing.assert_array_equal(table.cost, tables["cost"])
    np.testing.assert_array_equal(table.exits, tables["exits"])


def test_disabled_heads_are_not_charged():
    # Stages cost 10 each, heads 1 each: leaving at exit l with every head run costs
    # 11 (l + 1); the full model runs every stage and the last head only: 41.
    conf = np.array([[0.9, 0.1, 0.1, 0.0], [0.1, 0.1, 0.9, 0.0], [0.1, 0.1, 0.1, 0.0]])
    exit_cost = 11.0 * np.arange(1, 5)
    head_cost = np.ones(4)
    vectors = np.array([[0.5, 0.5, 0.5], [np.inf, 0.5, 0.5], [np.inf, np.inf, np.inf]])
    table = evaluate_vectors(
        conf, np.zeros((3, 4)), vectors, exit_cost=exit_cost, head_cost=head_cost
    )
    np.testing.assert_array_equal(table.exits, [[0, 2, 3], [3, 2, 3], [3, 3, 3]])
    expected = [[11, 33, 44], [43, 32, 43], [41, 41, 41]]
    np.testing.assert_array_equal(table.cost, expected)
    # Without head costs, every sample pays the cost of its exit.
    plain = evaluate_vectors(conf, np.zeros((3, 4)), vectors, exit_cost=exit_cost)
    np.testing.assert_array_equal(plain.cost, exit_cost[plain.exits])


def test_losses_are_relative_to_the_last_exit_for_every_risk():
    conf = np.array([[0.9, 0.2, 1.0], [0.2, 0.9, 1.0]])
    per_exit = np.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[0.5, 0.2, 0.1], [0.3, 0.4, 0.6]]])
    table = evaluate_vectors(conf, per_exit, [[0.5, 0.5], [np.inf, np.inf]], loss_bounds=[1, 1])
    assert table.losses.shape == (2, 2, 2)
    np.testing.assert_allclose(table.losses[:, 0], [[1.0, 0.0], [0.4, -0.2]])
    np.testing.assert_array_equal(table.losses[:, 1], 0.0)  # the full model
    np.testing.assert_allclose(table.risks(), [[0.5, 0.0], [0.1, 0.0]])


def test_threshold_families_by_hand():
    lambdas = np.array([math.inf, 0.8, 0.4])
    constant = ThresholdFamily().vectors(lambdas, 3)
    np.testing.assert_array_equal(constant, [[math.inf] * 2, [0.8, 0.8], [0.4, 0.4]])
    calm = ThresholdFamily("calm", tau=2.0).vectors(lambdas, 3)
    np.testing.assert_allclose(calm[1], [0.72 + 0.1, 0.72 + 0.1 * math.exp(-1.0)])
    scaled = ThresholdFamily("scaled", tau=1.0).vectors(lambdas, 5)
    np.testing.assert_allclose(scaled[2], 0.4 * np.exp(-np.arange(4) / 4))
    assert np.all(np.isinf(scaled[0]))


@pytest.mark.parametrize(
    "family", [ThresholdFamily("calm", tau=3.0), ThresholdFamily("scaled", 1.0)]
)
def test_a_family_has_a_natural_order(rng, family):
    # Along a decreasing lambda grid every sample's exit moves earlier (or stays).
    conf = rng.random((200, 6))
    table = family_table(conf, np.zeros((200, 6)), family=family, lambdas=default_thresholds(0.02))
    assert np.all(np.diff(table.exits, axis=0) <= 0)
    assert np.all(table.exits[0] == 5)


def test_family_round_trip_and_validation():
    family = ThresholdFamily("scaled", tau=0.5)
    assert ThresholdFamily.from_dict(family.to_dict()) == family
    with pytest.raises(ValueError, match="kind"):
        ThresholdFamily("cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tau"):
        ThresholdFamily("calm", tau=-1.0)


def test_constant_family_table_is_build_table(rng):
    probs = rng.dirichlet(np.ones(4), size=(50, 3))
    conf = probs.max(-1)
    predictions = probs.argmax(-1)
    per_exit = (predictions != predictions[:, -1:]).astype(float)
    table = family_table(conf, per_exit, exit_cost=[1.0, 2.0, 3.0])
    reference = build_table(probs, risk="prediction_consistency", exit_cost=[1.0, 2.0, 3.0])
    np.testing.assert_array_equal(table.losses[0], reference["losses"])
    np.testing.assert_array_equal(table.cost, reference["cost"])


@pytest.mark.parametrize(
    ("vectors", "message"),
    [
        (np.zeros((2, 3)), "one threshold per exit"),
        (np.full((1, 2), np.nan), r"\[0, 1\] or inf .*got nan"),
        (np.array([[0.5, 1.5]]), r"\[0, 1\]"),
        (np.array([[0.5, -np.inf]]), r"\[0, 1\]"),
    ],
)
def test_bad_vectors_are_refused(vectors, message):
    with pytest.raises(ValueError, match=message):
        vector_exit_indices(np.full((4, 3), 0.5), vectors)


def test_bad_per_exit_losses_are_refused():
    conf = np.full((4, 3), 0.5)
    with pytest.raises(ValueError, match="risk 1 must be absolute losses"):
        evaluate_vectors(conf, np.stack([np.zeros((4, 3)), np.full((4, 3), 2.0)]), [[0.5, 0.5]])
    with pytest.raises(ValueError, match=r"shape \(R, 4, 3\)"):
        evaluate_vectors(conf, np.zeros((1, 5, 3)), [[0.5, 0.5]])
    with pytest.raises(ValueError, match="one per risk"):
        evaluate_vectors(conf, np.zeros((2, 4, 3)), [[0.5, 0.5]], loss_bounds=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="head_cost"):
        evaluate_vectors(conf, np.zeros((4, 3)), [[0.5, 0.5]], head_cost=[1.0])


# ------------------------------------------------------------------------------ tail risks


def test_exceedance_losses_by_hand():
    losses = np.array([[0.0, 0.0, 0.0], [0.05, 0.1, 0.3], [-0.2, 0.11, 1.0]])
    np.testing.assert_array_equal(exceedance_losses(losses, 0.1), [[0, 0, 0], [0, 0, 1], [0, 1, 1]])
    with pytest.raises(ValueError, match="tolerance"):
        exceedance_losses(losses, -0.1)


def test_exceedance_per_exit_is_the_indicator_of_the_configuration_loss(rng):
    conf = rng.random((300, 4))
    continuous = rng.random((300, 4))  # absolute losses, the last exit's too
    vectors = np.concatenate([scalar_vectors(default_thresholds(0.1), 4), rng.random((20, 3))])
    mean = evaluate_vectors(conf, continuous, vectors)
    tail = evaluate_vectors(conf, exceedance_per_exit(continuous, 0.25), vectors)
    np.testing.assert_array_equal(tail.losses[0], exceedance_losses(mean.losses[0], 0.25))
    np.testing.assert_array_equal(tail.losses[0, 0], 0.0)  # the full model never exceeds
