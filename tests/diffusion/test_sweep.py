"""The loss table by sweep: grid, row 0, bounds, costs, npz format and the CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from exitguard.tasks.diffusion.losses import ssim_loss  # noqa: E402
from exitguard.tasks.diffusion.model import exit_flops  # noqa: E402
from exitguard.tasks.diffusion.sample import (  # noqa: E402
    sample,
    sample_full,
    sample_noise,
    to_unit,
)
from exitguard.tasks.diffusion.sweep import (  # noqa: E402
    DiffusionSweep,
    grid_from_confidences,
    pilot_thresholds,
    sample_costs,
    sweep,
    sweep_cell,
    write_table,
)

LOSS = {"ssim": ssim_loss}


@pytest.fixture(scope="module")
def table(tiny_model, middle_threshold):
    grid = [math.inf, 1.0, middle_threshold + 0.01, middle_threshold, middle_threshold - 0.01, 0.0]
    return sweep(tiny_model, n=10, seed=3, thresholds=grid, batch_size=4)


def test_grid_from_confidences():
    rng = np.random.default_rng(0)
    conf = rng.random((4, 10, 3))  # (samples, steps, L - 1)
    grid = grid_from_confidences(conf, earliest_exit=1, count=8)
    assert grid[0] == math.inf and grid[-1] == 0.0
    assert np.all(np.diff(grid[1:]) < 0) and grid.size <= 8
    best = conf[..., 1:].max(-1).ravel()  # (40,)
    shares = [np.mean(best >= value) for value in grid[1:-1]]
    # 0.2% of the pilot steps leave early at the safest threshold, 99.8% at the last but one.
    assert shares == sorted(shares) and shares[0] == 1 / 40 and shares[-1] == 39 / 40
    assert grid[1] == pytest.approx(np.quantile(best, 0.998))
    assert grid[-2] == pytest.approx(np.quantile(best, 0.002))
    with pytest.raises(ValueError, match=r"`earliest_exit` must be an integer in \[0, 2\]"):
        grid_from_confidences(conf, earliest_exit=3)
    with pytest.raises(ValueError, match=r"`count` must be an integer >= 3; got 2\."):
        grid_from_confidences(conf, earliest_exit=0, count=2)


def test_pilot_grid_uses_its_own_noise(tiny_model):
    grid = pilot_thresholds(tiny_model, seed=3, n=4, count=6)
    assert grid[0] == math.inf and np.all(np.diff(grid) < 0) and grid[-1] == 0.0
    assert np.array_equal(grid, pilot_thresholds(tiny_model, seed=3, n=4, count=6))


def test_row_zero_is_the_full_model_and_loss_free(table, tiny_model):
    k, n, steps = table.exits.shape
    assert (k, n, steps) == (6, 10, 12)
    losses = table.table("ssim")
    assert np.all(losses[0] == 0.0)
    assert np.all((losses >= 0) & (losses <= 1))
    assert losses[-1].mean() > 0  # the most aggressive row changes the images
    assert np.all(table.exits[0] == 4)
    plain = sample_full(
        tiny_model, sample_noise(np.arange(10), seed=3, steps=12, image_shape=(1, 8, 8))
    )
    np.testing.assert_allclose(table.images[0], to_unit(plain.images).numpy(), rtol=0, atol=1e-5)


def test_rows_equal_single_threshold_runs(table, tiny_model):
    """The sweep's K x b batches give each row what sampling it alone gives (same noise)."""
    noise = sample_noise(np.arange(10), seed=3, steps=12, image_shape=(1, 8, 8))
    for k in (2, 3, 5):
        alone = sample(tiny_model, noise, threshold=float(table.thresholds[k]))
        assert np.array_equal(table.exits[k], alone.exits.numpy())
        np.testing.assert_allclose(
            table.images[k], to_unit(alone.images).numpy(), rtol=0, atol=1e-5
        )
        loss = ssim_loss(to_unit(alone.images), torch.from_numpy(table.images[0])).numpy()
        np.testing.assert_allclose(table.table("ssim")[k], loss, rtol=0, atol=1e-5)


def test_costs(table, tiny_model):
    flops = exit_flops(tiny_model)
    assert np.all(table.cost[0] == 12 * flops["full"])
    steps_cost = np.asarray(flops["to_exit"], dtype=np.float64)
    np.testing.assert_array_equal(table.cost[1:], steps_cost[table.exits[1:]].sum(-1))
    assert np.all(table.cost[-1] == 12 * flops["to_exit"][1])  # threshold 0: exit 1 always
    assert table.mean_exit[-1].tolist() == [1.0] * 10
    costs = sample_costs(np.full((1, 2, 3), 4), [math.inf], flops)
    assert costs.tolist() == [[3 * flops["full"]] * 2]


def test_npz_works_with_the_command_line(table, tmp_path, capsys):
    from exitguard.cli import main

    path = write_table(table, tmp_path / "diffusion.npz")
    with np.load(path, allow_pickle=False) as data:
        assert {"losses", "cost", "thresholds"} <= set(data.files)
        assert data["losses"].shape == data["cost"].shape == (6, 10)
        assert data["thresholds"][0] == math.inf
    assert main(["calibrate", str(path), "--target-risk", "0.1", "--json"]) == 0
    assert '"procedure"' in capsys.readouterr().out
    assert main(["evaluate", str(path), "--n-cal", "5", "--trials", "3"]) == 0
    loaded = DiffusionSweep.load(path)
    np.testing.assert_array_equal(loaded.table("ssim"), table.table("ssim"))
    np.testing.assert_array_equal(loaded.exits, table.exits)
    assert loaded.flops == table.flops and loaded.earliest_exit == 1


def test_sweep_bad_inputs(tiny_model):
    with pytest.raises(ValueError, match="`thresholds` must be strictly decreasing"):
        sweep(tiny_model, n=2, seed=0, thresholds=[0.2, 0.5])
    with pytest.raises(ValueError, match=r"`losses` must name some of \('ssim', 'features'\)"):
        sweep(tiny_model, n=2, seed=0, thresholds=[0.5], losses={"lpips": ssim_loss})
    with pytest.raises(ValueError, match=r"`n` must be a positive integer; got 0\."):
        sweep(tiny_model, n=0, seed=0, thresholds=[0.5])
    with pytest.raises(ValueError, match=r"`loss` must be one of the computed losses \['ssim'\]"):
        sweep(tiny_model, n=1, seed=0, thresholds=[0.0]).table("features")


def test_threshold_groups_make_the_same_table_cell_by_cell(table, tiny_model):
    """Two thresholds per call: each cell without row 0 takes the full model's images of its
    samples as the loss reference; the exits are the same and the images agree to float32
    rounding (other batches), and the sweep is a loop over :func:`sweep_cell`."""
    grid = table.thresholds
    grouped = sweep(tiny_model, n=10, seed=3, thresholds=grid, batch_size=4, thresholds_per_batch=2)
    assert np.array_equal(grouped.exits, table.exits)
    np.testing.assert_allclose(grouped.images, table.images, rtol=0, atol=1e-5)
    np.testing.assert_allclose(grouped.table("ssim"), table.table("ssim"), rtol=0, atol=1e-5)
    assert np.all(grouped.table("ssim")[0] == 0.0)
    ids = np.arange(4, 8)
    head = sweep_cell(tiny_model, ids, seed=3, thresholds=grid, rows=[0, 1], losses=LOSS)
    tail = sweep_cell(
        tiny_model,
        ids,
        seed=3,
        thresholds=grid,
        rows=[2, 3],
        reference=torch.from_numpy(head.images[0]),
        losses=LOSS,
    )
    assert np.array_equal(tail.images, grouped.images[2:4, 4:8])
    assert np.array_equal(tail.losses["ssim"], grouped.table("ssim")[2:4, 4:8])
    with pytest.raises(ValueError, match=r"`reference` must be the full model's images, shape"):
        sweep_cell(tiny_model, ids, seed=3, thresholds=grid, rows=[2, 3], losses=LOSS)
    with pytest.raises(ValueError, match=r"`rows` must be increasing grid rows in \[0, 5\]"):
        sweep_cell(tiny_model, ids, seed=3, thresholds=grid, rows=[3, 2], losses=LOSS)
    with pytest.raises(ValueError, match=r"`thresholds_per_batch` must be a positive integer"):
        sweep(tiny_model, n=2, seed=0, thresholds=grid, thresholds_per_batch=0)
