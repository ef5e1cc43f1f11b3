"""Fixtures for the text-classification tests: a tiny randomly initialised BERT (no weights),
a tiny WordPiece tokenizer, and token batches of mixed lengths."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WORDS = (
    "and the lord said unto moses in beginning god created heaven earth jesus wept "
    "blessed are poor spirit for theirs is kingdom of grace be with you all amen"
).split()


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_tiny_bert(
    *, seed: int = 0, n_layers: int = 4, vocab: int = 64, width: int = 32, scale: float = 0.15
):
    """A tiny BERT encoder (eval mode); ``scale``: the std of its weight matrices (large enough
    for varied predictions; None keeps BERT's initialisation)."""
    config = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=width,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        intermediate_size=2 * width,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    encoder = transformers.BertModel(config)
    if scale is not None:
        with torch.no_grad():
            for parameter in encoder.parameters():
                if parameter.ndim == 2:
                    parameter.normal_(0.0, scale)
    return encoder.eval()


def make_network(encoder, *, num_classes: int = 5, seed: int = 1, confidence="max_softmax"):
    """The tiny encoder with exit heads whose weights give spread-out confidences."""
    from exitguard.tasks.text.model import TextHeadConfig, build_text_network

    torch.manual_seed(seed)
    network = build_text_network(
        encoder, num_classes, heads=TextHeadConfig(drop_rate=0.0), confidence=confidence
    )
    with torch.no_grad():
        for head in network.heads:
            head.classifier.fc.weight.normal_(0.0, 0.6)
    return network.eval()


def make_tokens(lengths, *, total=None, vocab: int = 64, seed: int = 0):
    """Right-padded token ids (3..vocab-1) and masks of the given lengths: (B, 2, T)."""
    lengths = torch.as_tensor(lengths)
    total = total or int(lengths.max())
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), total), generator=generator)
    mask = (torch.arange(total)[None, :] < lengths[:, None]).long()  # (B, T)
    return torch.stack([ids * mask, mask], dim=1)  # (B, 2, T)


def mixed_lengths(n: int, *, seed: int = 0, low: int = 2, high: int = 24):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (n,), generator=generator)


def save_tiny_model(folder, *, seed: int = 0):
    """A model folder like MiniLM's: tiny BERT safetensors, config and a WordPiece tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = transformers.BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)})
    tokenizer.save_pretrained(folder)
    make_tiny_bert(seed=seed, vocab=len(vocab), scale=None).save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_bert():
    return make_tiny_bert()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-bert"))
