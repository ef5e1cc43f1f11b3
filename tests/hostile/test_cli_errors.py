"""Bad files and arguments end in one clear line and exit status 2, never a traceback."""

import io
import json
import os
import re

import numpy as np
import pytest

from exitguard.cli import main
from tests.hostile.conftest import npy_bytes, write_zip


def run_error(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"exitguard {argv[0]}: error: ")
    assert "Traceback" not in captured.err
    return lines[0]


def make(tmp_path, kind):
    path = tmp_path / "input.npz"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "json":
        path.write_text(json.dumps({"losses": [[0, 0], [1, 0]]}))
    elif kind == "truncated":
        np.savez(path, losses=np.zeros((20, 300)))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "no-members":
        write_zip(path, {})
    elif kind == "text-member":
        write_zip(
            path,
            {
                "losses.npy": npy_bytes(
                    {"descr": "<f8", "fortran_order": False, "shape": (1, 2)}, b"\0" * 16
                ),
                "notes.txt": b"hi",
            },
        )
    elif kind == "object":
        buffer = io.BytesIO()
        np.save(buffer, np.array([[0, None]], dtype=object), allow_pickle=True)
        write_zip(path, {"losses.npy": buffer.getvalue()})
    elif kind in ("strings", "complex", "datetime", "structured"):
        values = {
            "strings": np.array([["0", "0"], ["0.5", "0"]]),
            "complex": np.zeros((2, 3), dtype=complex),
            "datetime": np.zeros((2, 3), dtype="datetime64[s]"),
            "structured": np.zeros((2, 3), dtype=[("a", "f8"), ("b", "i4")]),
        }[kind]
        np.savez(path, losses=values)
    elif kind == "float-labels":
        np.savez(path, probs=np.full((4, 2, 3), 1 / 3), labels=np.array([0.5, 1, 2, 0]))
    elif kind == "negative-labels":
        np.savez(path, probs=np.full((4, 2, 3), 1 / 3), labels=np.array([-1, 1, 2, 0]))
    elif kind == "terabytes":
        header = {"descr": "<f8", "fortran_order": False, "shape": (10**7, 10**7)}
        write_zip(path, {"losses.npy": npy_bytes(header, b"\0" * 64)})
    elif kind == "bad-thresholds":
        np.savez(path, losses=np.zeros((3, 5)), thresholds=np.array([np.inf, 0.5, -np.inf]))
    elif kind == "negative-cost":
        np.savez(path, losses=np.zeros((3, 5)), cost=np.array([3.0, -1.0, 1.0]))
    elif kind == "nan-cost":
        np.savez(path, losses=np.zeros((3, 5)), cost=np.array([3.0, np.nan, 1.0]))
    return str(path)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("empty", "is not an .npz file"),
        ("json", "is not an .npz file"),
        ("truncated", "is not a readable .npz file"),
        ("no-members", "is not an .npz file"),
        ("text-member", "'notes.txt', which is not a .npy array"),
        ("object", "has dtype object"),
        ("strings", "has dtype <U3"),
        ("complex", "has dtype complex128"),
        ("datetime", "has dtype datetime64"),
        ("structured", "has dtype"),
        ("float-labels", "`labels` must hold integer class indices"),
        ("negative-labels", "`labels` must hold class indices >= 0; got a minimum of -1"),
        ("terabytes", "would need about 727.6 TiB of memory, above the limit"),
        ("bad-thresholds", "`thresholds` must be finite numbers in"),
        ("negative-cost", "`cost` must be >= 0"),
        ("nan-cost", "`cost` must be finite"),
    ],
)
def test_bad_input_files(kind, message, tmp_path, capsys):
    line = run_error(["calibrate", make(tmp_path, kind), "--target-risk", "0.1"], capsys)
    assert re.search(message, line), line


def test_output_targets_are_checked_before_any_work(table_file, tmp_path, capsys):
    base = ["calibrate", table_file, "--target-risk", "0.1", "--out"]
    assert "is a folder" in run_error([*base, str(tmp_path)], capsys)
    assert "does not exist" in run_error([*base, str(tmp_path / "no" / "p.json")], capsys)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert "is a FIFO; refusing to replace it" in run_error([*base, str(fifo)], capsys)
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "elsewhere.json")
    assert "is a symbolic link" in run_error([*base, str(link)], capsys)
    assert not (tmp_path / "elsewhere.json").exists()


def test_a_full_disk_is_one_line_and_keeps_the_old_file(table_file, tmp_path, capsys, monkeypatch):
    target = tmp_path / "policy.json"
    target.write_text("old")

    def no_space(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("exitguard._files.os.fsync", no_space)
    line = run_error(
        ["calibrate", table_file, "--target-risk", "0.1", "--out", str(target)], capsys
    )
    assert "could not write" in line and "No space left on device" in line
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.json", "table.npz"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("fifo", "is a FIFO, not a regular file"),
        ("nested", "nested too deeply"),
        ("duplicate", "duplicate key"),
        ("list", "must be a JSON object"),
    ],
)
def test_bad_policy_files_for_apply(content, message, tmp_path, capsys):
    policy = tmp_path / "policy.json"
    if content == "fifo":
        os.mkfifo(policy)
    elif content == "nested":
        policy.write_text("[" * 50000 + "]" * 50000)
    elif content == "duplicate":
        policy.write_text('{"schema": "exitguard.ExitPolicy", "schema": "x"}')
    else:
        policy.write_text("[]")
    outputs = tmp_path / "out.npz"
    np.savez(outputs, probs=np.full((4, 2, 3), 1 / 3), labels=np.array([0, 1, 2, 0]))
    assert message in run_error(["apply", str(policy), str(outputs)], capsys)


def test_huge_trial_counts_are_refused_before_allocating(table_file, capsys):
    line = run_error(["evaluate", table_file, "--trials", "1000000000"], capsys)
    assert "evaluate with trials=1000000000" in line and "above the limit" in line


def test_zero_trials_is_refused_not_replaced(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["demo", "--task", "calm", "--quick", "--trials", "0"])
    assert stop.value.code == 2
    assert "must be an integer >= 1; got 0" in capsys.readouterr().err


def test_quick_respects_an_explicit_trial_count(tmp_path, capsys):
    out = tmp_path / "calm.json"
    assert main(["demo", "--task", "calm", "--quick", "--trials", "7", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["trials"] == 7


def test_traceback_flag_shows_the_error(table_file):
    with pytest.raises(ValueError, match="target_risk"):
        main(["--traceback", "calibrate", table_file, "--target-risk", "2"])


def test_a_bug_is_not_disguised_as_an_input_error(table_file, capsys, monkeypatch):
    """A ValueError raised deep in a library (not by exitguard's checks) is an internal error."""
    import numpy as np

    def broken(*args, **kwargs):
        return np.zeros(3).reshape(2, 2)  # raises ValueError inside numpy

    monkeypatch.setattr("exitguard.cli.calibrate_table", broken)
    assert main(["calibrate", table_file, "--target-risk", "0.1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("exitguard calibrate: internal error: ValueError: cannot reshape")
    assert "this is a bug in exitguard" in err and err.count("\n") == 1
