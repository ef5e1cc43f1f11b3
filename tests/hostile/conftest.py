import io
import zipfile

import numpy as np
import pytest

from exitguard._files import FileSafetyError


def npy_bytes(header: dict, payload: bytes = b"") -> bytes:
    """A .npy member with a hand-written header (e.g. one that claims a huge shape)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + payload


def assert_refuses_link(save, link) -> None:
    """``save(link)``, with ``link`` a planted symbolic link to a precious file: refused with a
    FileSafetyError naming the link, the file and the link left as they were."""
    victim = link.parent / "victim.txt"
    victim.write_text("precious")
    link.symlink_to(victim)
    with pytest.raises(FileSafetyError, match="is a symbolic link; refusing to replace it"):
        save(link)
    assert victim.read_text() == "precious" and link.is_symlink()


def write_zip(path, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return str(path)


@pytest.fixture
def table_file(tmp_path):
    start = np.random.default_rng(0).integers(1, 40, size=300)
    losses = (np.arange(20)[:, None] >= start[None, :]).astype(float)
    path = tmp_path / "table.npz"
    np.savez(
        path,
        losses=losses,
        cost=np.arange(20.0),
        thresholds=np.r_[np.inf, np.linspace(1, 0.05, 19)],
    )
    return str(path)
