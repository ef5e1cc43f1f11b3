"""Files are written atomically, through unpredictable temporary names, never through links."""

import json
import os
import stat

import numpy as np
import pytest

from exitguard import calibrate_table, evaluate, load_policy
from exitguard._files import FileSafetyError, atomic_save, atomic_write
from tests.hostile.conftest import assert_refuses_link


@pytest.fixture
def policy():
    table = np.zeros((3, 50))
    table[2, :5] = 1.0
    return calibrate_table(table, target_risk=0.2, procedure="crc")


def test_a_planted_link_at_the_old_temporary_name_redirects_nothing(policy, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / ".policy.json.tmp").symlink_to(victim)  # the old, predictable temporary name
    policy.save(tmp_path / "policy.json")
    assert victim.read_text() == "precious"
    assert load_policy(tmp_path / "policy.json") == policy


def test_an_existing_link_is_never_followed(policy, tmp_path):
    assert_refuses_link(policy.save, tmp_path / "policy.json")


def test_special_files_are_never_replaced(policy, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(FileSafetyError, match="is a FIFO"):
        policy.save(fifo)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    with pytest.raises(FileSafetyError, match="is a folder"):
        policy.save(tmp_path)
    device = tmp_path / "null"
    try:
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (PermissionError, OSError):
        pytest.skip("cannot create a device node here")
    with pytest.raises(FileSafetyError, match="is a character device"):
        policy.save(device)
    assert stat.S_ISCHR(os.lstat(device).st_mode)


@pytest.mark.parametrize("stage", ["write", "fsync", "replace"])
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, stage):
    target = tmp_path / "out.json"
    target.write_text("old")

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if stage == "write":
        with pytest.raises(OSError, match=r"could not write .* any previous file is unchanged"):
            atomic_write(target, lambda handle: fail())
    else:
        monkeypatch.setattr(f"exitguard._files.os.{stage}", fail)
        with pytest.raises(OSError, match="No space left on device"):
            atomic_write(target, b"new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_save_through_a_library_writer(tmp_path):
    target = tmp_path / "weights.bin"
    atomic_save(target, lambda name: open(name, "wb").write(b"abc"))
    assert target.read_bytes() == b"abc"
    mode = stat.S_IMODE(os.stat(target).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
    with pytest.raises(RuntimeError):
        atomic_save(target, lambda name: (_ for _ in ()).throw(RuntimeError("boom")))
    assert target.read_bytes() == b"abc" and len(list(tmp_path.iterdir())) == 1


def test_evaluation_files_are_written_the_same_way(tmp_path):
    result = evaluate(np.zeros((3, 40)), procedures=["crc"], target_risks=[0.2], n_cal=10, trials=2)
    assert_refuses_link(result.save, tmp_path / "results.json")
    path = result.save(tmp_path / "ok.json")
    assert type(result).load(path) == result
    assert json.loads(path.read_text())["schema"] == "exitguard.Evaluation"
