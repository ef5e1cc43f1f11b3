import importlib
import json

import numpy as np
import pytest

from exitguard.cli import main

CALM = "calm_cnndm.npz"


@pytest.fixture
def calm_file(calm, tmp_path):
    path = tmp_path / CALM
    np.savez(path, **calm)
    return str(path)


def test_calibrate_json(calm, calm_file, capsys):
    code = main(
        [
            "calibrate",
            calm_file,
            "--target-risk",
            "0.05",
            "--delta",
            "0.1",
            "--procedure",
            "ucb-wsr",
            "--order-seed",
            "4",
            "--json",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    warnings_seen = out.pop("warnings")
    from exitguard import ExitPolicy, calibrate_table

    expected = calibrate_table(
        calm["losses"],
        target_risk=0.05,
        delta=0.1,
        procedure="ucb-wsr",
        cost=calm["cost"],
        thresholds=calm["thresholds"],
        seed=4,
    )
    assert ExitPolicy.from_dict(out) == expected  # the same policy, field by field
    assert out["certified"] is True and out["n"] == 2000 and warnings_seen == []


def test_calibrate_draws_a_fresh_reading_order_and_records_it(calm_file, capsys):
    seeds = []
    for _ in range(2):
        args = ["calibrate", calm_file, "--target-risk", "0.05", "--procedure", "ucb-wsr"]
        assert main([*args, "--json"]) == 0
        seeds.append(json.loads(capsys.readouterr().out)["order_seed"])
    assert seeds[0] != seeds[1]  # fresh entropy each time, as the guarantee needs
    assert main([*args, "--order-seed", str(seeds[0])]) == 0
    assert f"seed {seeds[0]}" in capsys.readouterr().out  # printed, so it can be repeated


def test_calibrate_writes_a_policy(calm_file, tmp_path, capsys):
    target = tmp_path / "policy.json"
    assert (
        main(
            [
                "calibrate",
                calm_file,
                "--target-risk",
                "0.1",
                "--procedure",
                "crc",
                "--out",
                str(target),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "certified       yes" in text and "policy written to" in text
    assert json.loads(target.read_text())["procedure"] == "crc"


def test_evaluate_json_equals_the_library(calm, calm_file, capsys):
    args = [
        "evaluate",
        calm_file,
        "--procedure",
        "naive",
        "crc",
        "ucb-wsr",
        "ltt",
        "--target-risk",
        "0.03",
        "0.1",
        "--n-cal",
        "100",
        "--trials",
        "20",
        "--json",
    ]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    from exitguard import evaluate

    expected = evaluate(
        calm["losses"],
        procedures=["naive", "crc", "ucb-wsr", "ltt"],
        target_risks=[0.03, 0.1],
        n_cal=100,
        trials=20,
        cost=calm["cost"],
        seed=0,
    )
    assert out["results"] == [row.to_dict() for row in expected.rows]
    assert (out["n_cal"], out["trials"], out["data_fingerprint"]) == (
        100,
        20,
        expected.data_fingerprint,
    )


def test_evaluate_table(calm_file, capsys):
    assert main(["evaluate", calm_file, "--trials", "5"]) == 0
    assert "procedure" in capsys.readouterr().out


def test_per_exit_file(tmp_path, rng, capsys):
    probs = rng.dirichlet(np.ones(3), size=(200, 3))
    path = tmp_path / "exits.npz"
    np.savez(path, probs=probs, labels=rng.integers(0, 3, 200))
    assert (
        main(
            [
                "calibrate",
                str(path),
                "--target-risk",
                "0.2",
                "--risk",
                "distribution_gap",
                "--procedure",
                "crc",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["loss_bound"] == 2.0 and out["risk"] == "distribution_gap" and out["n_exits"] == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["calibrate", "missing.npz", "--target-risk", "0.1"], "no such file"),
        (
            ["calibrate", "{calm}", "--target-risk", "1.5"],
            r"`target_risk` must be a float in \(0, 1\)",
        ),
        (
            ["calibrate", "{calm}", "--target-risk", "0.1", "--risk", "prediction_gap"],
            "--risk applies to per-exit files",
        ),
        (["evaluate", "{calm}", "--n-cal", "1"], "`n_cal` must be an integer >= 2"),
        (["calibrate", "{bad}", "--target-risk", "0.1"], "must hold `losses`"),
    ],
)
def test_errors_are_one_line(args, message, calm_file, tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, other=np.zeros(3))
    args = [a.format(calm=calm_file, bad=bad) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("exitguard ") and err.count("\n") == 1
    assert __import__("re").search(message, err)


def test_unknown_procedure_is_rejected_by_the_parser(calm_file):
    with pytest.raises(SystemExit):
        main(["calibrate", calm_file, "--target-risk", "0.1", "--procedure", "magic"])


def test_demo_quick(capsys, tmp_path):
    out_file = tmp_path / "demo.json"
    assert main(["demo", "--task", "calm", "--quick", "--out", str(out_file)]) == 0
    text = capsys.readouterr().out
    assert "ucb-wsr" in text and "layers" in text
    assert json.loads(out_file.read_text())["trials"] == 20


@pytest.mark.parametrize(
    ("task", "n_cal"), [("classification", 100), ("segmentation", 400), ("diffusion", 500)]
)
def test_demo_passes_its_options_to_the_task(monkeypatch, capsys, task, n_cal):
    pytest.importorskip("torch")
    module = importlib.import_module(f"exitguard.tasks.{task}")
    seen = {}

    def fake_run_demo(config):
        seen["config"] = config
        return {"summary": ["ran"]}

    monkeypatch.setattr(module, "run_demo", fake_run_demo)
    argv = ["demo", "--task", task, "--quick", "--seed", "3", "--out", "rep", "--no-progress"]
    assert main(argv) == 0
    config = seen["config"]
    assert isinstance(config, module.DemoConfig)
    assert (config.n_cal, config.seed, config.out, config.quick, config.progress) == (
        n_cal,
        3,
        "rep",
        True,
        False,
    )
    assert main([*argv, "--n-cal", "50"]) == 0 and seen["config"].n_cal == 50
    assert "- ran" in capsys.readouterr().out


def test_demo_ray_options_reach_the_task(monkeypatch, capsys):
    pytest.importorskip("torch")
    from exitguard.distributed.options import RaySettings

    module = importlib.import_module("exitguard.tasks.diffusion")
    seen = {}
    monkeypatch.setattr(
        module, "run_demo", lambda config: seen.update(config=config) or {"summary": []}
    )
    base = ["demo", "--task", "diffusion", "--quick"]
    assert main([*base, "--ray"]) == 0  # no value: a local Ray
    assert seen["config"].ray == RaySettings(address="local")
    assert main([*base, "--ray", "auto", "--workers", "3", "--shards", "parts"]) == 0
    assert seen["config"].ray == RaySettings(address="auto", workers=3, shards="parts")
    assert main(base) == 0 and seen["config"].ray is None
    capsys.readouterr()
    for task in ("segmentation", "calm"):
        assert main(["demo", "--task", task, "--ray"]) == 2
        assert "--ray applies to --task classification or diffusion" in capsys.readouterr().err
    assert main([*base, "--workers", "2"]) == 2
    assert "`--workers` and `--shards` apply to a run with `--ray`" in capsys.readouterr().err
