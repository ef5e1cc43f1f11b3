import math

import numpy as np
import pytest

from exitguard.risk.exits import as_threshold_grid, default_thresholds, exit_index, exit_indices


def loop_exits(conf: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Slow reference: the exit rule written out sample by sample."""
    n, n_exits = conf.shape
    out = np.empty((len(grid), n), dtype=int)
    for k, t in enumerate(grid):
        for i in range(n):
            out[k, i] = n_exits - 1
            for exit_ in range(n_exits - 1):
                if conf[i, exit_] >= t:
                    out[k, i] = exit_
                    break
    return out


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
