"""Scenes from real items: layout from the seed, masks from the items' own pixels."""

import numpy as np
import pytest

from exitguard.data.images import ImageDataset, load_dataset
from exitguard.data.scenes import make_scenes, upscale


def tiny_items():
    """Two 2x2 items: class 0 is a bright square, class 1 has one dark (background) pixel."""
    images = np.zeros((2, 1, 2, 2), dtype=np.float32)
    images[0, 0] = 0.9
    images[1, 0] = [[0.5, 0.0], [0.5, 0.5]]
    return ImageDataset("tiny", images, np.array([0, 1]), ("a", "b"), "test")


def test_one_item_scene_by_hand():
    items = tiny_items()
    scenes = make_scenes(items, n=50, size=4, min_items=1, max_items=1, seed=3)
    assert scenes.class_names == ("background", "a", "b")
    assert scenes.images.shape == (50, 1, 4, 4) and scenes.labels.shape == (50, 4, 4)
    for image, mask in zip(scenes.images[:, 0], scenes.labels, strict=True):
        ys, xs = np.nonzero(image)
        top, left = ys.min(), xs.min()
        patch = image[top : top + 2, left : left + 2]
        label = 1 if np.all(patch > 0) else 2
        item = items.images[label - 1, 0]
        np.testing.assert_array_equal(patch, item)
        expected = np.zeros((4, 4), dtype=np.int64)
        expected[top : top + 2, left : left + 2] = np.where(item > 20 / 255, label, 0)
        np.testing.assert_array_equal(mask, expected)


def test_later_items_lie_on_top_in_image_and_mask_alike():
    items = tiny_items()  # item "a" is 0.9 everywhere, item "b" 0.5 on three pixels
    scenes = make_scenes(items, n=400, size=3, min_items=2, max_items=3, seed=0)
    image, mask = scenes.images[:, 0], scenes.labels
    expected = np.select([np.isclose(image, 0.9), np.isclose(image, 0.5)], [1, 2], 0)
    np.testing.assert_array_equal(mask, expected)  # the visible item owns every pixel
    both = ((mask == 1).any(axis=(1, 2)) & (mask == 2).any(axis=(1, 2))).mean()
    assert 0.2 < both < 0.9  # overlaps of both kinds really happen


def test_deterministic_from_the_seed():
    items = load_dataset("digits")
    a = make_scenes(upscale(items, 2), n=20, size=32, seed=5)
    b = make_scenes(upscale(items, 2), n=20, size=32, seed=5)
    c = make_scenes(upscale(items, 2), n=20, size=32, seed=6)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert a.image_shape == (1, 32, 32) and a.num_classes == 11


def test_upscale_repeats_pixels():
    items = tiny_items()
    big = upscale(items, 3)
    assert big.images.shape == (2, 1, 6, 6)
    np.testing.assert_array_equal(big.images[1, 0, :3, 3:], 0.0)
    assert upscale(items, 1) is items
    with pytest.raises(ValueError, match="`factor` must be a positive integer; got 0"):
        upscale(items, 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "`n` must be a positive integer; got 0"),
        ({"n": 2, "min_items": 3, "max_items": 2}, r"`max_items` must be >= `min_items` \(3\)"),
        ({"n": 2, "size": 1}, r"`size` must be an integer >= the item side \(2\); got 1"),
        ({"n": 2, "threshold": 1.0}, r"`threshold` must lie in \[0, 1\); got 1.0"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_scenes(tiny_items(), **kwargs)
