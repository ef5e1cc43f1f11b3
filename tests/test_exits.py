import math

import numpy as np
import pytest

from exitguard.risk.exits import (
    as_threshold_grid,
    check_threshold_vector,
    default_thresholds,
    exit_index,
    exit_indices,
    first_exit,
)
from tests.conftest import loop_exits


def test_matches_loop_reference(rng):
    conf = rng.random((50, 4))
    conf[:5] = 1.0  # saturated confidences still never exit under row 0
    grid = default_thresholds(0.05)
    np.testing.assert_array_equal(exit_indices(conf, grid), loop_exits(conf, grid))


def test_row_zero_is_full_model_whatever_the_confidences():
    conf = np.ones((3, 5))
    exits = exit_indices(conf, [0.5, 0.0])
    assert exits.shape == (3, 3)
    np.testing.assert_array_equal(exits[0], [4, 4, 4])
    np.testing.assert_array_equal(exits[1:], 0)


def test_ties_exit_at_threshold():
    # ">=" semantics: a confidence equal to the threshold fires.
    exits = exit_indices(np.array([[0.7, 0.2, 0.9]]), [0.7])
    np.testing.assert_array_equal(exits[:, 0], [2, 0])


def test_exits_move_earlier_as_threshold_falls(rng):
    exits = exit_indices(rng.random((200, 6)))
    assert np.all(np.diff(exits, axis=0) <= 0)
    np.testing.assert_array_equal(exits[-1], 0)  # threshold 0: everyone leaves at exit 0


def test_single_threshold_matches_grid(rng):
    conf = rng.random((30, 3))
    np.testing.assert_array_equal(exit_index(conf, 0.4), exit_indices(conf, [0.4])[1])
    np.testing.assert_array_equal(exit_index(conf, math.inf), 2)


def test_list_and_array_inputs_agree():
    conf = [[0.1, 0.9], [0.8, 0.2]]
    np.testing.assert_array_equal(
        exit_indices(conf, [0.5]), exit_indices(np.array(conf), np.array([0.5]))
    )


def test_default_grid():
    grid = default_thresholds()
    assert grid[0] == math.inf and grid[1] == 1.0 and grid[-1] == 0.0 and len(grid) == 102


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ([0.2, 0.5], "strictly decreasing"),
        ([1.5, 0.5], r"must lie in \[0, 1\]"),
        ([], "non-empty"),
        ([0.5, float("nan")], "NaN"),
    ],
)
def test_bad_grids(grid, message):
    with pytest.raises(ValueError, match=message):
        as_threshold_grid(grid)


def test_bad_confidences():
    with pytest.raises(ValueError, match="`confidences` must be 2-D; got shape"):
        exit_indices(np.zeros(4))
    with pytest.raises(ValueError, match="`confidences` must be finite; got 1 NaN"):
        exit_indices([[0.1, np.nan]])


def test_one_rule_for_arrays_and_tensors(rng):
    """first_exit is the rule everywhere: numpy here, torch in real skipping and samplers."""
    from exitguard.risk.exits import check_thresholds, first_exit

    fires = rng.random((50, 4)) < 0.3  # (n, L-1)
    loop = [next((e for e in range(4) if row[e]), 4) for row in fires]
    np.testing.assert_array_equal(first_exit(fires), loop)
    torch = pytest.importorskip("torch")
    np.testing.assert_array_equal(first_exit(torch.from_numpy(fires)).numpy(), loop)
    for bad in (1.5, -0.1, float("nan"), -float("inf")):
        with pytest.raises(ValueError, match=r"must be a float in \[0, 1\] or inf"):
            check_thresholds([0.5, bad])
    with pytest.raises(TypeError, match="must be a float in"):
        check_thresholds(True)


# ------------------------------------------------------------------ threshold vectors


def loop_vector_exits(conf: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """Slow reference: the per-exit rule written out sample by sample."""
    n, n_exits = conf.shape
    out = np.full(n, n_exits - 1)
    for i in range(n):
        for exit_ in range(n_exits - 1):
            if conf[i, exit_] >= vector[exit_]:
                out[i] = exit_
                break
    return out


def test_first_exit_with_vectors_matches_loop_reference(rng):
    conf = rng.random((60, 5))
    conf[:4, :2] = [[0.5, 0.5]] * 4  # ties at a threshold fire
    for _ in range(20):
        vector = rng.choice([0.0, 0.3, 0.5, 0.8, math.inf], size=4)
        np.testing.assert_array_equal(
            first_exit(conf[:, :-1], vector), loop_vector_exits(conf, vector)
        )
        np.testing.assert_array_equal(exit_index(conf, vector), loop_vector_exits(conf, vector))


def test_first_exit_broadcasts_scalars_samples_and_exits(rng):
    conf = rng.random((30, 4))
    scalar = first_exit(conf[:, :-1], 0.6)
    np.testing.assert_array_equal(scalar, exit_index(conf, 0.6))
    np.testing.assert_array_equal(first_exit(conf[:, :-1], np.full(3, 0.6)), scalar)
    per_sample = np.where(np.arange(30) % 2 == 0, 0.6, math.inf)[:, None]  # (n, 1)
    exits = first_exit(conf[:, :-1], per_sample)
    np.testing.assert_array_equal(exits[::2], scalar[::2])
    np.testing.assert_array_equal(exits[1::2], 3)
    # The all-inf vector is the full model; a vector of zeros leaves at exit 0.
    np.testing.assert_array_equal(exit_index(conf, [math.inf] * 3), 3)
    np.testing.assert_array_equal(exit_index(conf, [0.0] * 3), 0)


def test_first_exit_agrees_on_numpy_and_torch(rng):
    torch = pytest.importorskip("torch")
    conf = rng.random((40, 4))
    vector = np.array([0.9, math.inf, 0.4])
    expected = first_exit(conf[:, :-1], vector)
    got = first_exit(torch.from_numpy(conf[:, :-1]), torch.from_numpy(vector))
    np.testing.assert_array_equal(got.numpy(), expected)


@pytest.mark.parametrize(
    ("vector", "error", "message"),
    [
        ([0.5], ValueError, r"one threshold per exit but the last: shape \(2,\) for 3 exits"),
        ([0.5, 1.5], ValueError, r"`threshold` must be a float in \[0, 1\] or inf .*got 1.5"),
        ([0.5, -math.inf], ValueError, r"got -inf"),
        ([True, False], TypeError, "`threshold` must be a float"),
    ],
)
def test_bad_threshold_vectors(vector, error, message):
    with pytest.raises(error, match=message):
        exit_index(np.full((2, 3), 0.5), vector)
    with pytest.raises(error, match=message.replace("`threshold`", "`thresholds`")):
        check_threshold_vector(vector, 3, name="thresholds")
