"""Offline model loading and the exit-head cache (rebuilt when corrupted)."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from exitguard.tasks.language.model import cache_dir, load_model, model_fingerprint  # noqa: E402
from exitguard.tasks.language.train import cached_exit_heads  # noqa: E402
from tests.language.conftest import small_train_config  # noqa: E402

SMALL = small_train_config(n_tokens=512, epochs=1, confidence_tokens=256, confidence_epochs=2)


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EXITGUARD_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path


def test_load_model_from_a_folder(tiny_model_folder):
    model, tokenizer = load_model(tiny_model_folder)
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert tokenizer.decode(tokenizer("def f(x):", add_special_tokens=False)["input_ids"]) == (
        "def f(x):"
    )
    assert model_fingerprint(model) == model_fingerprint(load_model(tiny_model_folder)[0])


def test_load_model_rejects_unknown_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="`name_or_path` must be 'smollm2' or a model"):
        load_model(tmp_path / "nowhere")


def test_cached_heads_are_reused_and_rebuilt_when_corrupted(tmp_path, tiny_model_folder):
    model, tokenizer = load_model(tiny_model_folder)
    folder = tmp_path / "heads"
    kwargs = dict(corpus="pydoc", exit_layers=(1, 3), rank=4, config=SMALL, progress=False)
    heads, meta = cached_exit_heads(model, tokenizer, folder=folder, **kwargs)
    assert meta["corpus"] == "pydoc" and "report" in meta
    stamp = (folder / "heads.safetensors").stat().st_mtime_ns
    again, _ = cached_exit_heads(model, tokenizer, folder=folder, **kwargs)
    assert (folder / "heads.safetensors").stat().st_mtime_ns == stamp  # reused, not retrained
    for a, b in zip(heads.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    (folder / "heads.safetensors").write_bytes(b"\x00" * 64)  # corrupt it
    rebuilt, _ = cached_exit_heads(model, tokenizer, folder=folder, **kwargs)
    for a, b in zip(heads.state_dict().values(), rebuilt.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # seeded: the rebuild is identical
    meta = json.loads((folder / "heads.json").read_text())
    meta["key"] = "stale"
    (folder / "heads.json").write_text(json.dumps(meta))
    cached_exit_heads(model, tokenizer, folder=folder, **kwargs)  # other settings: retrained
    assert json.loads((folder / "heads.json").read_text())["key"] != "stale"
