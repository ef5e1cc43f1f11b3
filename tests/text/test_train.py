"""Training the text exits: heads on cached features, joint fine-tuning, the cache."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.text.conftest import WORDS, make_network, make_tiny_bert, make_tokens, mixed_lengths

torch = pytest.importorskip("torch")

from exitguard.tasks.text.data import TextDataset  # noqa: E402
from exitguard.tasks.text.model import TextHeadConfig, pooled_features  # noqa: E402
from exitguard.tasks.text.train import (  # noqa: E402
    TextTrainSettings,
    load_or_train,
    train_heads,
)

KEYWORDS = ("moses", "jesus", "heaven")


def load_quietly(data, settings, encoder_path, cache_dir, **options):
    """``load_or_train`` on a local encoder, with no progress bar and no log."""
    return load_or_train(
        data,
        settings=settings,
        encoder_path=encoder_path,
        cache_dir=cache_dir,
        progress=False,
        log=lambda _: None,
        **options,
    )


def keyword_dataset(n: int, *, seed: int = 0) -> TextDataset:
    """Sentences of common words; the class is the one keyword each contains."""
    rng = np.random.default_rng(seed)
    filler = [w for w in WORDS if w not in KEYWORDS]
    labels = rng.integers(0, len(KEYWORDS), n)
    texts = []
    for label in labels.tolist():
        words = rng.choice(filler, size=int(rng.integers(2, 8))).tolist()
        words.insert(int(rng.integers(0, len(words) + 1)), KEYWORDS[label])
        texts.append(" ".join(words))
    return TextDataset(
        name="keywords",
        texts=tuple(texts),
        labels=labels.astype(np.int64),
        groups=np.arange(n, dtype=np.int64),
        references=tuple(str(i) for i in range(n)),
        class_names=KEYWORDS,
        source="test sentences",
    )


def test_train_heads_learns_and_is_reproducible(tiny_bert):
    tokens = make_tokens(mixed_lengths(96, seed=2), seed=2)
    network = make_network(tiny_bert, num_classes=3)
    features = pooled_features(network, tokens)  # (n, L, D)
    direction = torch.from_numpy(np.random.default_rng(0).normal(size=(32, 3))).float()
    labels = (features[:, 0] @ direction).argmax(dim=1)  # linearly separable at exit 0
    before = [p.clone() for p in network.parameters()]
    encoder_before = {name: p.clone() for name, p in tiny_bert.named_parameters()}
    history = train_heads(network, features, labels, epochs=30, lr=1e-2, batch_size=32, seed=0)
    assert len(history["loss"]) == 30 and history["loss"][-1] < history["loss"][0]
    assert history["exit_accuracy"][-1][0] > 0.9
    assert all(b > a for a, b in zip(*history["exit_accuracy"][::29], strict=True))
    for name, parameter in tiny_bert.named_parameters():
        torch.testing.assert_close(parameter, encoder_before[name], rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(before, network.parameters(), strict=True))
    again = make_network(tiny_bert, num_classes=3)
    train_heads(again, features, labels, epochs=30, lr=1e-2, batch_size=32, seed=0)
    for a, b in zip(network.heads.parameters(), again.heads.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"`labels` must have shape \(96,\)"):
        train_heads(network, features, labels[:5], epochs=1, lr=1e-3, batch_size=8)


def test_settings_are_checked():
    with pytest.raises(ValueError, match=r"`mode` must be 'heads' or 'joint'; got 'all'"):
        TextTrainSettings(mode="all")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`head_epochs` must be a positive integer; got 0"):
        TextTrainSettings(head_epochs=0)
    with pytest.raises(ValueError, match=r"`joint_lr` must be a positive number; got 0"):
        TextTrainSettings(joint_lr=0)


def test_heads_mode_caches_the_heads_only(tiny_model_dir, tmp_path):
    data = keyword_dataset(120)
    settings = TextTrainSettings(mode="heads", head_epochs=40, head_lr=1e-2, head_batch_size=16)
    heads = TextHeadConfig(drop_rate=0.0)
    first = load_quietly(data, settings, tiny_model_dir, tmp_path, heads=heads)
    assert not first.from_cache
    accuracy = first.metadata["history"]["heads"]["exit_accuracy"][-1]
    assert accuracy[-1] > 0.9  # the keyword is easy to find
    (weights,) = tmp_path.glob("text-heads-keywords-*.safetensors")
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        names = list(handle.keys())
    assert names and all(".classifier." in name for name in names)  # no encoder weights
    second = load_quietly(data, settings, tiny_model_dir, tmp_path, heads=heads)
    assert second.from_cache
    tokens = make_tokens([4, 7, 2], vocab=20)
    with torch.inference_mode():
        torch.testing.assert_close(first.network(tokens), second.network(tokens))
    meta = json.loads(weights.with_suffix(".json").read_text())
    assert meta["description"]["train"]["mode"] == "heads"


def test_joint_mode_fine_tunes_the_encoder(tiny_model_dir, tmp_path):
    data = keyword_dataset(48)
    settings = TextTrainSettings(
        mode="joint", head_epochs=5, joint_epochs=1, joint_batch_size=16, joint_lr=1e-3
    )
    trained = load_quietly(data, settings, tiny_model_dir, tmp_path)
    history = trained.metadata["history"]
    assert list(history["joint"]["config"]["loss_weights"]) == [1.0, 2.0, 3.0, 4.0]  # PABEE
    assert history["joint"]["config"]["distill"] == 0.5
    pristine = make_tiny_bert(vocab=trained.encoder.config.vocab_size, scale=None)
    changed = [
        not torch.equal(a, b)
        for a, b in zip(pristine.parameters(), trained.encoder.parameters(), strict=True)
    ]
    assert any(changed)
    again = load_quietly(data, settings, tiny_model_dir, tmp_path)
    assert again.from_cache
    for a, b in zip(trained.encoder.parameters(), again.encoder.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
