"""Fixtures for the language-model tests: a tiny randomly initialised Llama (no weights)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """One torch thread for the tiny models here (see tests/conftest.py)."""


def make_tiny_llama(*, seed: int = 0, n_layers: int = 6, vocab: int = 97):
    """A tiny Llama: 6 layers, hidden 32, 4 heads, 2 KV heads (GQA), tied embeddings."""
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    # Random weights with a larger scale than the default give peaked, varied distributions.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.normal_(0.0, 0.2)
    model.eval()
    model.requires_grad_(False)
    return model


def small_train_config(**changes):
    """Exit-head training of a few seconds on the tiny Llama; ``changes`` shrink it further."""
    from exitguard.tasks.language.train import TrainConfig

    settings = dict(
        n_tokens=1024,
        window=32,
        top_k=8,
        epochs=3,
        batch_tokens=128,
        confidence_tokens=512,
        confidence_epochs=5,
    )
    return TrainConfig(**{**settings, **changes})


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_heads(tiny_llama):
    from exitguard.tasks.language.heads import ExitHeads, ExitHeadsConfig

    config = ExitHeadsConfig(exit_layers=(1, 3), hidden_size=32, rank=4, confidence_width=8)
    torch.manual_seed(1)
    heads = ExitHeads(config, final_norm_weight=tiny_llama.model.norm.weight)
    with torch.no_grad():
        for parameter in heads.parameters():
            parameter.normal_(0.0, 0.3)
    heads.eval()
    return heads


def save_tiny_model_folder(folder, *, seed: int = 0):
    """A tiny Llama plus a character-level tokenizer, saved like any Hugging Face model."""
    import string

    from tokenizers import Tokenizer, decoders, models

    model = make_tiny_llama(seed=seed)
    alphabet = string.ascii_letters + string.digits + " .,:;'\"()-\n_=*[]{}<>/#"
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for char in alphabet:
        if len(vocab) < model.config.vocab_size:
            vocab.setdefault(char, len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory):
    return save_tiny_model_folder(tmp_path_factory.mktemp("tiny-llama"))
