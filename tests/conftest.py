import functools

import numpy as np
import pytest

CALM_PATH = "calm_cnndm.npz"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20241)


@functools.cache
def calm_table() -> dict[str, np.ndarray]:
    """The released CALM CNN/DM loss table, as embedded in the package."""
    from importlib import resources

    source = resources.files("exitguard") / "data" / CALM_PATH
    with resources.as_file(source) as path, np.load(path) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="session")
def calm() -> dict[str, np.ndarray]:
    """The released CALM CNN/DM loss table, as embedded in the package."""
    return calm_table()
