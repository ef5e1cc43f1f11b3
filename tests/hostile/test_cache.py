"""The model cache: damaged JSON is rebuilt, an unwritable folder is found before training, and
concurrent writers of one entry never leave a mismatched weights/JSON pair."""

from __future__ import annotations

import hashlib
import json
import os
import threading

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from torch import nn  # noqa: E402

from exitguard.tasks.common import cached_model  # noqa: E402

DESCRIPTION = {"format": "test", "width": 3}


class Recorder:
    """Collects the cache's messages and the training calls, in order."""

    def __init__(self):
        self.events = []
        self.lock = threading.Lock()

    def log(self, line):
        with self.lock:
            self.events.append(("log", line))

    def trained(self, tag):
        with self.lock:
            self.events.append(("train", tag))

    @property
    def trainings(self):
        return [tag for kind, tag in self.events if kind == "train"]

    @property
    def lines(self):
        return [line for kind, line in self.events if kind == "log"]


def fetch(folder, recorder, *, value=1.0, tag="only", build=None, pause=None):
    def train(module):
        recorder.trained(tag)
        if pause is not None:
            pause()
        with torch.no_grad():
            module.weight.fill_(value)
            module.bias.fill_(value)
        return {"tag": tag}

    return cached_model(
        "toy",
        DESCRIPTION,
        build=build or (lambda: nn.Linear(3, 2)),
        train=train,
        seed=0,
        cache_dir=folder,
        log=recorder.log,
    )


def entry(folder):
    (weights,) = folder.glob("toy-*.safetensors")
    return weights, weights.with_suffix(".json")


@pytest.mark.parametrize("content", ["[]", "null", '"text"', "3", "[1, 2]", "{"])
def test_a_damaged_entry_json_is_rebuilt(tmp_path, content):
    recorder = Recorder()
    first = fetch(tmp_path, recorder)
    assert not first.from_cache
    _, meta = entry(tmp_path)
    meta.write_text(content)
    rebuilt = fetch(tmp_path, recorder)
    assert not rebuilt.from_cache and recorder.trainings == ["only", "only"]
    assert any("unusable" in line for line in recorder.lines)
    assert fetch(tmp_path, recorder).from_cache  # and the entry is whole again


def test_a_mismatched_pair_is_never_accepted(tmp_path):
    recorder = Recorder()
    fetch(tmp_path / "a", recorder, value=1.0)
    fetch(tmp_path / "b", recorder, value=2.0)
    weights_a, _ = entry(tmp_path / "a")
    weights_b, _ = entry(tmp_path / "b")
    weights_a.write_bytes(weights_b.read_bytes())  # another writer's weights, this JSON
    again = fetch(tmp_path / "a", recorder, value=1.0)
    assert not again.from_cache and torch.all(again.module.weight == 1.0)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_a_read_only_cache_folder_is_found_before_training(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        recorder = Recorder()
        result = fetch(folder, recorder)
    finally:
        folder.chmod(0o700)
    assert not result.from_cache and torch.all(result.module.weight == 1.0)
    assert recorder.events[0][0] == "log" and "cannot be written" in recorder.events[0][1]
    assert recorder.trainings == ["only"] and list(folder.iterdir()) == []


def test_a_cache_path_that_cannot_be_a_folder_is_found_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    recorder = Recorder()
    result = fetch(blocker / "models", recorder)
    assert not result.from_cache and torch.all(result.module.weight == 1.0)
    kinds = [kind for kind, _ in recorder.events]
    assert kinds == ["log", "train"], recorder.events  # the message comes before training
    assert "cannot be written" in recorder.lines[0] and "EXITGUARD_CACHE" in recorder.lines[0]
    assert blocker.read_text() == "not a folder"


def test_a_read_only_cache_still_serves_its_entries(tmp_path):
    folder = tmp_path / "cache"
    recorder = Recorder()
    fetch(folder, recorder)
    for lock in folder.glob(".*.lock"):
        lock.unlink()  # a cache copied read-only from elsewhere has none
    folder.chmod(0o500)
    try:
        again = fetch(folder, recorder)
    finally:
        folder.chmod(0o700)
    assert again.from_cache and recorder.trainings == ["only"]


def test_two_writers_train_once_and_leave_a_matching_pair(tmp_path):
    """The first writer pauses inside training until the second one has started building its
    own model (or 2 s have passed). Without a lock the second trains too and the two write
    the same entry; with one it waits and loads the first one's entry."""
    recorder = Recorder()
    second_building = threading.Event()
    first_training = threading.Event()
    results = {}

    def second_build():
        second_building.set()
        return nn.Linear(3, 2)

    def pause():
        first_training.set()
        second_building.wait(timeout=2)

    def run(tag, **kwargs):
        results[tag] = fetch(tmp_path, recorder, tag=tag, **kwargs)

    first = threading.Thread(target=run, args=("first",), kwargs={"value": 1.0, "pause": pause})
    first.start()
    assert first_training.wait(timeout=30)
    second = threading.Thread(
        target=run, args=("second",), kwargs={"value": 2.0, "build": second_build}
    )
    second.start()
    first.join(timeout=60)
    second.join(timeout=60)
    assert recorder.trainings == ["first"], recorder.events
    assert results["second"].from_cache
    assert torch.equal(results["second"].module.weight, results["first"].module.weight)
    weights, meta = entry(tmp_path)
    metadata = json.loads(meta.read_text())
    assert metadata["tag"] == "first"
    assert metadata["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert any("waiting for another process" in line for line in recorder.lines)


def test_cache_writes_never_follow_links(tmp_path):
    recorder = Recorder()
    fetch(tmp_path, recorder)
    weights, _ = entry(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    weights.unlink()
    weights.symlink_to(victim)  # planted links where the weights and a temporary file go
    (tmp_path / f".{weights.name}.tmp").symlink_to(victim)
    again = fetch(tmp_path, recorder)
    assert not again.from_cache and victim.read_text() == "precious"
    assert any("could not cache" in line for line in recorder.lines)


def test_weights_of_another_architecture_are_never_loaded(tmp_path):
    """An entry written by an earlier version whose architecture has since changed (here under
    the same description) is retrained, never loaded into the wrong shape."""
    recorder = Recorder()
    fetch(tmp_path, recorder, build=lambda: nn.Linear(3, 2))
    again = fetch(tmp_path, recorder, build=lambda: nn.Linear(3, 4), tag="new shape")
    assert not again.from_cache and recorder.trainings == ["only", "new shape"]
    assert again.module.weight.shape == (4, 3)


def test_the_task_models_key_their_entries_by_architecture():
    from exitguard.tasks.classification import classifier_settings
    from exitguard.tasks.segmentation import SegmenterConfig, build_segmenter
    from exitguard.tasks.segmentation.model import CACHE_FORMAT

    # The description (and so the key) holds the whole model config, strides included.
    model, _ = classifier_settings("fashion-mnist")
    assert model.strides == (2, 1, 2, 1, 1)
    assert CACHE_FORMAT.endswith("/2")  # segmenters cached before the low-resolution exits
    segmenter = build_segmenter(SegmenterConfig(), image_shape=(1, 16, 16), num_classes=3)
    assert segmenter.resize is not None
