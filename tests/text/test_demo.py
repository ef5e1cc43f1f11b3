"""The text demo end to end on a tiny encoder and a small labelled set, and its CLI wiring."""

from __future__ import annotations

import json

import pytest

from tests.text.test_train import keyword_dataset

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")

from exitguard.cli import main  # noqa: E402
from exitguard.risk.losses import RISKS  # noqa: E402
from exitguard.tasks.text import demo  # noqa: E402
from exitguard.tasks.text.train import TextTrainSettings  # noqa: E402


def test_demo_writes_the_report_with_example_sentences(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "kjv_genres", lambda: keyword_dataset(300, seed=1))
    config = demo.DemoConfig(
        out=str(tmp_path / "report"),
        n_train=120,
        n_heldout=80,
        n_cal=40,
        trials=5,
        target_risks=(0.05, 0.1, 0.2),
        timing_sentences=16,
        timing_sentences_batch1=3,
        timing_repeats=1,
        n_examples=6,
        progress=False,
        cache_dir=str(tmp_path / "cache"),
        encoder_path=str(tiny_model_dir),
        train=TextTrainSettings(head_epochs=20, head_lr=1e-2, head_batch_size=16),
    )
    results = demo.run_demo(config, log=lambda _: None)
    assert (tmp_path / "report" / "index.html").is_file()
    saved = json.loads((tmp_path / "report" / "results.json").read_text())
    assert saved["task"] == "text" and set(saved["risks"]) == set(RISKS)
    assert set(saved["confidence_measures"]) == {"max_softmax", "margin", "entropy", "patience"}
    assert results["timing"]["real exits equal simulated exits"] is True
    assert results["dataset"]["unit"] == "verses" and results["dataset"]["n_heldout"] == 80
    assert len(results["model"]["accuracy_per_exit"]) == 4
    examples, measures = results["tables"]
    assert examples["header"][:4] == ["verse", "text", "genre", "exit"]
    assert len(examples["rows"]) == 6
    assert all(1 <= row[3] <= 4 for row in examples["rows"])
    assert len(measures["rows"]) == 4 * 3
    page = (tmp_path / "report" / "index.html").read_text()
    assert "Example test verses" in page and "held-out verses" in page
    assert sum(results["exit_histogram"]["counts"]) == 80 - 40


def test_cli_text_demo_rejects_image_options(capsys):
    assert main(["demo", "--task", "text", "--dataset", "fashion-mnist"]) == 2
    assert "--dataset and --data-path apply to the image tasks" in capsys.readouterr().err


def test_demo_config_is_checked():
    with pytest.raises(ValueError, match=r"`confidence` must be one of"):
        demo.DemoConfig(confidence="margins")
    with pytest.raises(ValueError, match=r"`training` must be 'heads' or 'joint'; got 'all'"):
        demo.DemoConfig(training="all")
