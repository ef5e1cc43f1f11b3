"""`exitguard lm` commands end to end on a tiny saved model (character tokenizer)."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from exitguard.policy import load_policy
from exitguard.tasks.language.binding import policy_fields_from_table
from exitguard.tasks.language.cli import add_lm_parser


def run(argv):
    parser = argparse.ArgumentParser(prog="exitguard")
    add_lm_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


@pytest.fixture
def workspace(tmp_path, monkeypatch, tiny_model_folder):
    monkeypatch.setenv("EXITGUARD_CACHE", str(tmp_path / "cache"))
    common = [
        "--model",
        str(tiny_model_folder),
        "--heads",
        str(tmp_path / "heads"),
        "--train-corpus",
        "pydoc",
        "--train-tokens",
        "512",
        "--every",
        "2",
        "--rank",
        "4",
        "--quiet",
        "--threads",
        "1",
    ]
    return tmp_path, common


def test_parser_registers_the_lm_group():
    parser = argparse.ArgumentParser(prog="exitguard")
    add_lm_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["lm", "sweep", "--out", "t.npz"])
    assert args.lm_command == "sweep" and args.confidence == "learned"
    with pytest.raises(SystemExit):
        parser.parse_args(["lm", "generate"])  # --prompt is required


def test_train_sweep_calibrate_generate(workspace, capsys):
    tmp_path, common = workspace
    assert run(["lm", "train-exits", *common]) == 0
    assert (tmp_path / "heads" / "heads.safetensors").is_file()
    assert "agree(head)" in capsys.readouterr().out

    table_path = tmp_path / "table.npz"
    argv = [
        "lm",
        "sweep",
        *common,
        "--out",
        str(table_path),
        "--corpus",
        "pydoc",
        "--n-prompts",
        "10",
        "--max-new-tokens",
        "6",
        "--grid",
        "4",
        "--prompt-tokens",
        "40",
    ]
    assert run(argv) == 0
    with np.load(table_path, allow_pickle=False) as data:
        losses, thresholds = data["losses"], data["thresholds"]
        assert losses.shape == (5, 10) and (losses[0] == 0).all()
        assert math.isinf(thresholds[0]) and data["cost"].shape == (5, 10)

    core_cli = pytest.importorskip("exitguard.cli")
    policy_path = tmp_path / "policy.json"
    argv = ["calibrate", str(table_path), "--target-risk", "0.5", "--procedure", "naive"]
    assert core_cli.main([*argv, "--out", str(policy_path)]) == 0  # the core reads the table
    capsys.readouterr()
    policy = load_policy(policy_path)
    with np.load(table_path, allow_pickle=False) as data:
        fields = policy_fields_from_table(data)
    # `exitguard calibrate` copies the sweep table's model fields into the policy.
    assert fields and policy.model_fingerprint == fields["model_fingerprint"]
    assert (policy.n_exits, policy.confidence) == (fields["n_exits"], fields["confidence"])
    assert (
        run(
            [
                "lm",
                "generate",
                *common,
                "--policy",
                str(policy_path),
                "--prompt",
                "def f",
                "--max-new-tokens",
                "5",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "exit  layers" in out and "mean exit layer" in out


def test_generate_rejects_bad_policy_files(workspace, capsys):
    from exitguard.policy import PolicyFileError

    tmp_path, common = workspace
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(PolicyFileError, match="is not valid JSON"):
        run(["lm", "generate", *common, "--policy", str(broken), "--prompt", "x"])
    alien = tmp_path / "alien.json"
    alien.write_text(json.dumps({"schema": "something else", "threshold": 0.5}))
    with pytest.raises(PolicyFileError, match="not an exitguard policy"):
        run(["lm", "generate", *common, "--policy", str(alien), "--prompt", "x"])
    with pytest.raises(ValueError, match="give `--policy` or `--threshold`, not both"):
        run(
            [
                "lm",
                "generate",
                *common,
                "--policy",
                str(alien),
                "--threshold",
                "0.5",
                "--prompt",
                "x",
            ]
        )


def test_standalone_main_reports_errors(workspace, capsys):
    from exitguard.tasks.language.cli import main

    tmp_path, common = workspace
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    assert main(["lm", "generate", *common, "--policy", str(bad), "--prompt", "x"]) == 2
    assert "a policy must be a JSON object" in capsys.readouterr().err


@pytest.mark.slow  # starts a local Ray whose workers import transformers
def test_sweep_on_ray_writes_the_same_table(workspace, capsys):
    ray = pytest.importorskip("ray")
    tmp_path, common = workspace
    assert run(["lm", "train-exits", *common]) == 0
    sweep = [*common, "--corpus", "pydoc", "--n-prompts", "6", "--max-new-tokens", "5"]
    sweep += ["--grid", "3", "--prompt-tokens", "30"]
    assert run(["lm", "sweep", *sweep, "--out", str(tmp_path / "plain.npz")]) == 0
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        argv = ["lm", "sweep", *sweep, "--out", str(tmp_path / "ray.npz"), "--ray"]
        assert run([*argv, "--workers", "2", "--shards", str(tmp_path / "shards")]) == 0
    finally:
        ray.shutdown()
    with np.load(tmp_path / "plain.npz") as plain, np.load(tmp_path / "ray.npz") as on_ray:
        for key in ("losses", "cost", "thresholds", "loss_disagreement", "layers", "tokens"):
            assert np.array_equal(plain[key], on_ray[key]), key
    assert sorted(p.name for p in (tmp_path / "shards").glob("*.npz"))[0] == "g00-b00000.npz"
