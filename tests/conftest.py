import contextlib
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


def sharpening_logits(
    rng: np.random.Generator, n: int, n_exits: int = 4, classes: int = 5
) -> tuple[np.ndarray, np.ndarray]:
    """Per-exit logits (n, n_exits, classes) whose exits grow sharper and more accurate with
    depth, and the labels (n,)."""
    labels = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, n_exits, classes))
    logits[np.arange(n), :, labels] += np.linspace(0.5, 4.0, n_exits)
    return logits, labels


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the last axis."""
    return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)


def loop_exits(conf: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """The exit rule written as loops, one sample and one threshold at a time: the reference
    the vectorised rule is checked against.

    ``thresholds`` holds K scalar thresholds (K,) or K threshold vectors (K, n_exits - 1);
    returns each sample's exit (K, n): its first exit whose confidence reaches the
    threshold, else the last.
    """
    n, n_exits = conf.shape
    out = np.full((len(thresholds), n), n_exits - 1)
    for k, threshold in enumerate(thresholds):
        vector = np.broadcast_to(threshold, (n_exits - 1,))
        for i in range(n):
            for exit_ in range(n_exits - 1):
                if conf[i, exit_] >= vector[exit_]:
                    out[k, i] = exit_
                    break
    return out


@contextlib.contextmanager
def torch_threads(count: int = 1):
    """Run torch on ``count`` threads inside the block, then on as many as before."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def one_torch_thread():
    """Tiny models: more torch threads only add contention (and make timings noisy)."""
    pytest.importorskip("torch")
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def calm() -> dict[str, np.ndarray]:
    """The released CALM CNN/DM loss table, as embedded in the package."""
    return calm_table()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """One model cache for the session: a model trained by one test loads in the next."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def classification_demo(tmp_path_factory, model_cache):
    """The main job (``exitguard demo``) on a tiny configuration, run once per session, into a
    folder that held an earlier run's report: (root, results, log lines); the report is in
    ``root / "report"``."""
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from exitguard.tasks.classification import DemoConfig, run_demo
    from tests.report_checks import earlier_report

    root = tmp_path_factory.mktemp("classification-demo")
    earlier_report(root / "report")
    config = DemoConfig(
        out=str(root / "report"),
        cache_dir=str(model_cache),
        epochs=2,
        timing_repeats=1,
        timing_images_batch1=20,
        progress=False,
        quick=True,
    )
    logs: list[str] = []
    results = run_demo(config, log=logs.append)
    return root, results, logs
