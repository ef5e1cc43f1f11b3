"""The demo's results dict: the schema the report reads, the figures, and the npz writer."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from exitguard.tasks.diffusion import DemoConfig, run_demo, write_demo_table  # noqa: E402
from exitguard.tasks.diffusion.model import DenoiserConfig  # noqa: E402
from exitguard.tasks.diffusion.train import TrainSettings  # noqa: E402
from tests.report_checks import check_demo_report, earlier_report  # noqa: E402

from .conftest import TINY  # noqa: E402


def tiny_config(tmp_path, **changes) -> DemoConfig:
    settings = {
        "model": DenoiserConfig(**TINY),
        "train": TrainSettings(iterations=40, batch_size=32, warmup=5, log_every=10),
        "n_samples": 30,
        "n_cal": 500,  # capped to half the samples
        "trials": 4,
        "losses": ("ssim",),
        "target_risks": (0.01, 0.05, 0.1),
        "n_thresholds": 6,
        "pilot_samples": 4,
        "timing_samples": 6,
        "timing_repeats": 1,
        "batch_size": 4,
        "progress": False,
        "cache_dir": str(tmp_path / "cache"),
        "out": str(tmp_path / "report"),
    }
    settings.update(changes)
    return DemoConfig(**settings)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_demo(tiny_config(tmp_path_factory.mktemp("demo")), log=lambda _: None)


def test_results_schema(results):
    assert results.task == "diffusion"
    assert results.settings.n_cal == 15
    model = results.model
    assert model.n_exits == 5 and len(model.flops_per_exit) == 5
    assert model.description.startswith("U-ViT noise predictor")
    evaluation = results.risks["ssim"].evaluation
    assert {row.procedure for row in evaluation.rows} == {"naive", "crc", "ucb-wsr", "ltt"}
    assert results.risks["ssim"].loss_bound == 1.0
    timed = results.timed
    assert sum(timed.exit_counts) == 6 * 12 and timed.counted == "(sample, denoising step) pairs"
    assert timed.exit_counts[0] == 0  # no sample leaves before the earliest exit (1)
    assert results.policy["procedure"] == "ucb-wsr"
    (speed,) = timed.speeds
    assert speed.baseline > 0 and speed.unit == "samples per second"


def test_figures(results):
    samples, *maps = results.figures
    assert samples.file == "diffusion_samples.png"
    assert samples.columns[0] == "full model"
    assert samples.columns.count("full model") == 1  # the full model's column once
    assert len(set(samples.columns)) == len(samples.columns)
    for row in samples.rows:
        assert row.label.startswith("seed ")
        assert len(row.cells) == len(samples.columns)
        for cell in row.cells:
            assert cell.image.shape == (8, 8) and cell.image.min() >= 0 and cell.image.max() <= 1
            assert (cell.cmap, cell.vmin, cell.vmax) == ("gray", 0.0, 1.0)
    for exits in maps:
        assert exits.colorbar.startswith("exit") and exits.xticks and exits.yticks
        for row in exits.rows:
            (cell,) = row.cells
            assert cell.image.shape[1] == 12 and cell.image.min() >= 1 and cell.image.max() <= 4
            assert (cell.cmap, cell.vmin, cell.vmax) == ("viridis", 0.0, 4.0)


def test_report_draws_the_results(results, tmp_path):
    pytest.importorskip("matplotlib")
    import json

    from exitguard.report import write_report

    page = write_report(json.loads(json.dumps(results.to_dict())), tmp_path / "report")
    assert page.is_file()
    for grid in results.figures:
        assert (tmp_path / "report" / grid.file).is_file()


def test_demo_writes_its_report_and_the_table(tmp_path):
    pytest.importorskip("matplotlib")
    config = tiny_config(tmp_path, n_samples=8, trials=2, n_thresholds=4, timing_samples=2)
    earlier_report(tmp_path / "report")
    (tmp_path / "report" / "notes.txt").write_text("mine")
    results = run_demo(config, log=lambda _: None)
    (tmp_path / "report" / "notes.txt").unlink()  # a user's file stays, and is not ours
    check_demo_report(tmp_path / "report", results, data_files=["table_ssim.npz", "policy.json"])
    with np.load(tmp_path / "report" / "table_ssim.npz", allow_pickle=False) as data:
        assert data["thresholds"][0] == math.inf and np.all(data["losses"][0] == 0)
    path = write_demo_table(config, tmp_path / "table.npz", log=lambda _: None)
    with np.load(path, allow_pickle=False) as data:
        assert data["thresholds"][0] == math.inf and np.all(data["losses"][0] == 0)


def test_config_validation():
    with pytest.raises(ValueError, match=r"`losses` must name some of \('ssim', 'features'\)"):
        DemoConfig(losses=("lpips",))
    with pytest.raises(ValueError, match="`policy_loss` must be one of `losses`"):
        DemoConfig(losses=("features",))
