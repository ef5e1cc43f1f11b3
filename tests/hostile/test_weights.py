"""Weights files: corruption is detected, a refused load changes nothing, non-finite weights
are refused, writes are atomic and never follow links, model folders load safetensors only."""

from __future__ import annotations

import hashlib
import math
import os
import re
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

from exitguard.nn import EarlyExitNetwork, load_weights, save_weights  # noqa: E402
from tests.hostile.conftest import assert_refuses_link  # noqa: E402


def small_network(seed: int = 0) -> EarlyExitNetwork:
    torch.manual_seed(seed)
    stages = [nn.Linear(4, 8), nn.Sequential(nn.ReLU(), nn.Linear(8, 8)), nn.Linear(8, 3)]
    heads = [nn.Linear(8, 3), nn.Linear(8, 3)]
    return EarlyExitNetwork(stages, heads, input_shape=(4,)).eval()


def snapshot(network):
    return {name: tensor.clone() for name, tensor in network.state_dict().items()}


def assert_unchanged(network, before):
    for name, tensor in network.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name} was overwritten"


def oracle_checksum(tensors) -> str:
    """The documented checksum, written out independently: sorted names, dtype, shape, bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def craft(path, network, tensors, **extra):
    """A weights file with valid exitguard metadata for ``network`` and a correct checksum."""
    metadata = {
        "format": "exitguard.EarlyExitNetwork",
        "n_exits": str(network.n_exits),
        "fingerprint": network.fingerprint,
        "confidence": network.confidence,
        "tensors_sha256": oracle_checksum(tensors),
        **extra,
    }
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_saved_checksum_is_the_documented_one(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = save_weights(small_network(), tmp_path / "w.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        recorded = handle.metadata()["tensors_sha256"]
    assert recorded == oracle_checksum(load_file(str(path)))


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_corrupted_tensor_bytes_are_refused(tmp_path, where):
    path = save_weights(small_network(), tmp_path / "w.safetensors")
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # the tensor bytes follow the header
    at = {"first": start, "middle": (start + len(data)) // 2, "last": len(data) - 1}[where]
    data[at] ^= 0x40
    path.write_bytes(bytes(data))
    target = small_network(seed=1)
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"do not match the checksum in its metadata"):
        load_weights(target, path)
    assert_unchanged(target, before)


def tensors_of(network):
    return {k: v.clone() for k, v in network.state_dict().items()}


@pytest.mark.parametrize("damage", ["missing", "unexpected", "shape"])
def test_a_refused_load_leaves_the_network_unchanged(tmp_path, damage):
    source, target = small_network(seed=0), small_network(seed=1)
    tensors = tensors_of(source)
    if damage == "missing":
        del tensors["heads.1.bias"]  # the last tensor, so that the others would load first
    elif damage == "unexpected":
        tensors["stages.9.weight"] = torch.zeros(2)
    else:
        tensors["heads.1.weight"] = torch.zeros(3, 9)
    path = craft(tmp_path / "w.safetensors", target, tensors)
    before = snapshot(target)
    with pytest.raises((ValueError, RuntimeError)) as caught:
        load_weights(target, path)
    assert_unchanged(target, before)
    assert caught.type is ValueError
    assert re.search(r"does not match the network: .*left unchanged", str(caught.value))


def test_non_strict_load_takes_the_matching_tensors(tmp_path):
    source, target = small_network(seed=0), small_network(seed=1)
    tensors = tensors_of(source)
    del tensors["heads.1.bias"]
    path = craft(tmp_path / "w.safetensors", target, tensors)
    kept = target.state_dict()["heads.1.bias"].clone()
    load_weights(target, path, strict=False)
    assert torch.equal(target.state_dict()["stages.0.weight"], tensors["stages.0.weight"])
    assert torch.equal(target.state_dict()["heads.1.bias"], kept)


def test_tied_weights_are_stored_once_and_load_back(tmp_path):
    def tied(seed):
        network = small_network(seed)
        network.heads[1].weight = network.heads[0].weight  # one tensor under two names
        return network

    source, target = tied(0), tied(1)
    path = save_weights(source, tmp_path / "w.safetensors")
    load_weights(target, path)
    assert target.heads[1].weight is target.heads[0].weight
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_weights_are_refused(tmp_path, value):
    broken = small_network()
    with torch.no_grad():
        broken.stages[1][1].weight.fill_(value)
    with pytest.raises(ValueError, match=r"refusing to save weights with NaN or infinite"):
        save_weights(broken, tmp_path / "broken.safetensors")
    assert not (tmp_path / "broken.safetensors").exists()

    path = craft(tmp_path / "w.safetensors", broken, tensors_of(broken))
    target = small_network(seed=1)
    before = snapshot(target)
    with pytest.raises(
        ValueError, match=r"refusing to load weights with NaN or infinite values: stages\.1\.1"
    ):
        load_weights(target, path)
    assert_unchanged(target, before)

    load_weights(target, path, allow_non_finite=True)  # the explicit choice
    with pytest.warns(UserWarning, match=r"NaN or infinite logits"):
        target.infer(torch.randn(3, 4), math.inf)


def test_a_file_without_checksum_needs_an_explicit_choice(tmp_path):
    source, target = small_network(seed=0), small_network(seed=1)
    tensors = tensors_of(source)
    path = tmp_path / "w.safetensors"
    metadata = {
        "format": "exitguard.EarlyExitNetwork",
        "n_exits": str(target.n_exits),
        "fingerprint": target.fingerprint,
    }
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError, match=r"records no checksum of its tensors"):
        load_weights(target, path)
    load_weights(target, path, require_checksum=False)
    assert torch.equal(target.state_dict()["heads.0.weight"], tensors["heads.0.weight"])


def test_saving_never_writes_through_a_link(tmp_path):
    network = small_network()
    assert_refuses_link(lambda link: save_weights(network, link), tmp_path / "w.safetensors")


def test_a_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    import safetensors.torch

    path = save_weights(small_network(seed=0), tmp_path / "w.safetensors")
    old = path.read_bytes()

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\0" * 10)  # a partial write, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    monkeypatch.setattr(safetensors.torch, "save_model", full_disk, raising=False)
    with pytest.raises(OSError, match=r"No space left on device"):
        save_weights(small_network(seed=1), path)
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]  # no leftovers


FIFO_PROBE = """
import sys, torch
from torch import nn
from exitguard.nn import EarlyExitNetwork, load_weights
network = EarlyExitNetwork([nn.Linear(2, 2), nn.Linear(2, 2)], [nn.Linear(2, 2)])
try:
    load_weights(network, sys.argv[1])
except ValueError as error:
    print(type(error).__name__, error)
"""


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "w.safetensors"
    os.mkfifo(fifo)
    # In a child process: a reader blocked inside a C extension would hold this one forever.
    try:
        done = subprocess.run(
            [sys.executable, "-c", FIFO_PROBE, str(fifo)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("load_weights blocked on a FIFO")
    assert "is a FIFO, not a regular file" in done.stdout, done.stdout + done.stderr


def test_model_folders_load_safetensors_only(tmp_path):
    pytest.importorskip("transformers")
    from exitguard.tasks.language.model import load_model
    from tests.language.conftest import make_tiny_llama

    folder = tmp_path / "pickled"
    model = make_tiny_llama()
    model.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # a pickle
    (folder / "model.safetensors").unlink()
    with pytest.raises((FileNotFoundError, ValueError), match=r"safetensors"):
        load_model(folder)


def test_saved_outputs_never_follow_links(tmp_path):
    from exitguard.nn import collect

    network = small_network()
    outputs = collect(network, torch.randn(5, 4))
    assert_refuses_link(outputs.save, tmp_path / "outputs.npz")
    (tmp_path / "outputs.npz").unlink()
    assert outputs.save(tmp_path / "outputs.npz").is_file()


@pytest.mark.parametrize("cut", [4, 60, -3])
def test_a_truncated_file_is_refused_clearly(tmp_path, cut):
    path = save_weights(small_network(), tmp_path / "w.safetensors")
    path.write_bytes(path.read_bytes()[:cut])
    target = small_network(seed=1)
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"is not a readable safetensors file"):
        load_weights(target, path)
    assert_unchanged(target, before)
