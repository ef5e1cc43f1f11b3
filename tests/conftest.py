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


@pytest.fixture
def one_torch_thread():
    """Tiny models: more torch threads only add contention (and make timings noisy)."""
    torch = pytest.importorskip("torch")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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
