"""The text network: equal to the plain transformers forward, real skipping equal to the
simulated exits at every batch size and with mixed lengths, FLOPs by length."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.text.conftest import make_network, make_tiny_bert, make_tokens, mixed_lengths

torch = pytest.importorskip("torch")

from exitguard.nn import count_flops  # noqa: E402
from exitguard.tasks.text import model as text_model  # noqa: E402
from exitguard.tasks.text.model import (  # noqa: E402
    TokenPoolHead,
    build_text_network,
    encode_texts,
    flops_by_length,
    length_batches,
    plain_logits,
    token_lengths,
    trim_padding,
)

MEASURES = ("max_softmax", "margin", "entropy", "patience")


def test_last_exit_equals_the_plain_transformers_forward_with_padding(tiny_bert):
    network = make_network(tiny_bert)
    tokens = make_tokens([3, 17, 9, 1, 24, 24, 6], total=30)  # over-padded, mixed lengths
    with torch.inference_mode():
        staged = network(tokens)[:, -1]  # (B, C)
        plain = plain_logits(tiny_bert, network.heads[-1], tokens)
        hidden = tiny_bert(input_ids=tokens[:, 0], attention_mask=tokens[:, 1]).last_hidden_state
    torch.testing.assert_close(staged, plain, rtol=1e-5, atol=1e-6)
    # The head's mean pool over the plain forward's hidden states, computed independently.
    mask = tokens[:, 1, :, None].float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(staged, network.heads[-1].classifier(pooled), rtol=1e-5, atol=1e-5)


def test_every_exit_reads_its_own_layer(tiny_bert):
    network = make_network(tiny_bert)
    tokens = make_tokens([5, 11, 8])
    with torch.inference_mode():
        logits = network(tokens)  # (B, L, C)
        hidden = tiny_bert(
            input_ids=tokens[:, 0], attention_mask=tokens[:, 1], output_hidden_states=True
        ).hidden_states  # L + 1 tensors: embeddings, then every layer
        mask = tokens[:, 1, :, None].float()
        for exit_, head in enumerate(network.heads):
            pooled = (hidden[exit_ + 1] * mask).sum(1) / mask.sum(1)
            torch.testing.assert_close(
                logits[:, exit_], head.classifier(pooled), rtol=1e-5, atol=1e-5
            )


def _between(conf, shares):
    """Thresholds halfway between neighbouring confidence values (no ties with any sample)."""
    values = np.unique(conf.numpy().ravel())
    if values.size < 2:
        return []
    return [float(values[i : i + 2].mean()) for i in {int(s * (values.size - 2)) for s in shares}]


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_real_skipping_equals_simulated_exits(tiny_bert, measure, batch):
    network = make_network(tiny_bert, confidence=measure)
    tokens = make_tokens(mixed_lengths(batch, seed=batch), total=26, seed=batch)
    with torch.inference_mode():
        conf = network.exit_confidences(tokens)[1]  # (B, L)
    grid = [0.0, *_between(conf[:, :-1], (0.3, 0.6)), 1.0, math.inf]
    seen = set()
    for threshold in grid:
        real = network.infer(tokens, threshold)
        simulated = network.simulate(tokens, threshold)
        assert real.exits.tolist() == simulated.exits.tolist(), threshold
        torch.testing.assert_close(real.logits, simulated.logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(real.probs, simulated.probs, rtol=1e-4, atol=1e-6)
        seen.update(real.exits.tolist())
    if batch > 1 and measure != "patience":
        assert len(seen) >= 3  # the grid really makes samples leave at different exits


def test_samples_alone_equal_samples_in_a_batch(tiny_bert):
    network = make_network(tiny_bert, confidence="patience")
    tokens = make_tokens(mixed_lengths(7, seed=3), total=25, seed=3)
    for threshold in (0.5, 1.0):
        batch = network.infer(tokens, threshold)
        for i in range(tokens.shape[0]):
            alone = network.infer(tokens[i : i + 1], threshold)
            assert alone.exits.item() == batch.exits[i].item()
            torch.testing.assert_close(alone.logits[0], batch.logits[i], rtol=1e-4, atol=1e-5)


def _record_layer_inputs(encoder):
    """Shapes of the hidden states each encoder layer receives."""
    seen: list[tuple[int, tuple[int, ...]]] = []
    hooks = [
        layer.register_forward_pre_hook(
            lambda _m, args, kwargs, i=i: seen.append((i, tuple(args[0].shape))),
            with_kwargs=True,
        )
        for i, layer in enumerate(encoder.encoder.layer)
    ]
    return seen, hooks


def test_leaving_samples_are_removed_and_padding_trimmed(tiny_bert):
    network = make_network(tiny_bert)
    lengths = torch.tensor([20, 4, 6, 5, 20, 3])
    tokens = make_tokens(lengths, total=32)
    with torch.inference_mode():
        conf = network.exit_confidences(tokens)[1]
    # A threshold that lets both long sentences (and only those) leave at the first exit.
    threshold = float(conf[[0, 4], 0].min())
    others = torch.tensor([1, 2, 3, 5])
    if float(conf[others, 0].max()) >= threshold:
        pytest.skip("random weights gave the short sentences a higher first-exit confidence")
    seen, hooks = _record_layer_inputs(tiny_bert)
    try:
        result = network.infer(tokens, threshold)
    finally:
        for hook in hooks:
            hook.remove()
    assert result.exits[[0, 4]].tolist() == [0, 0]
    assert seen[0] == (0, (6, 20, 32))  # trailing all-padding columns dropped before layer 0
    remaining = [shape for layer, shape in seen if layer == 1]
    assert remaining[0][:2] == (4, 6)  # the two long sentences left: 4 rows of 6 tokens go on
    simulated = network.simulate(tokens, threshold)
    assert result.exits.tolist() == simulated.exits.tolist()


def test_the_mask_matters_for_padded_samples(tiny_bert, monkeypatch):
    """Without the attention mask, padded sentences change and the longest does not: the
    equality tests above would catch a stage that lost the mask."""
    network = make_network(tiny_bert)
    tokens = make_tokens([12, 5, 8])
    with torch.inference_mode():
        masked = network(tokens)
        monkeypatch.setattr(text_model, "_attention_mask", lambda *args: None)
        unmasked = network(tokens)
    torch.testing.assert_close(masked[0], unmasked[0])
    assert not torch.allclose(masked[1:], unmasked[1:], atol=1e-3)


def test_mean_pool_ignores_padding():
    head = TokenPoolHead(4, 3, pool="mean")
    state = torch.randn(1, 5, 5)
    state[..., -1] = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])
    padded = state.clone()
    padded[:, 3:, :-1] = 100.0  # whatever the padding holds
    torch.testing.assert_close(head.forward_pool(state), head.forward_pool(padded))
    torch.testing.assert_close(head.forward_pool(state), state[:, :3, :-1].mean(dim=1))
    cls = TokenPoolHead(4, 3, pool="cls")
    torch.testing.assert_close(cls.forward_pool(state), state[:, 0, :-1])
    with pytest.raises(ValueError, match=r"`pool` must be 'mean' or 'cls'; got 'max'"):
        TokenPoolHead(4, 3, pool="max")  # type: ignore[arg-type]


def test_flops_grow_with_length_and_match_count_flops(tiny_bert):
    network = make_network(tiny_bert)
    lengths = np.array([4, 9, 4, 16])
    to_exit, full = flops_by_length(network, lengths)
    assert to_exit.shape == (4, network.n_exits) and full.shape == (4,)
    np.testing.assert_array_equal(to_exit[0], to_exit[2])
    assert (np.diff(to_exit, axis=1) > 0).all()  # every layer costs something
    assert to_exit[1, -1] > to_exit[0, -1] and to_exit[3, -1] > to_exit[1, -1]
    counted = count_flops(network, make_tokens([9]))
    np.testing.assert_array_equal(to_exit[1], counted.to_exit)
    assert full[1] == counted.full < to_exit[1, -1]  # no intermediate head under never-exit
    # Attention makes the cost superlinear in the length.
    assert to_exit[3, -1] > 4 * to_exit[0, -1]
    with pytest.raises(ValueError, match=r"`lengths` must be a non-empty 1-D array"):
        flops_by_length(network, np.array([0, 3]))


def test_tokens_helpers():
    tokens = make_tokens([3, 1, 5], total=9)
    assert token_lengths(tokens).tolist() == [3, 1, 5]
    assert trim_padding(tokens).shape == (3, 2, 5)
    lengths = np.array([5, 1, 3, 9, 2])
    assert [b.tolist() for b in length_batches(lengths, batch_size=2)] == [[0, 1], [2, 3], [4]]
    batches = length_batches(lengths, batch_size=2, sort_by_length=True)
    assert [b.tolist() for b in batches] == [[1, 4], [2, 0], [3]]
    with pytest.raises(ValueError, match=r"`batch_size` must be a positive integer; got 0"):
        length_batches(lengths, batch_size=0)


def test_encode_texts_pads_right_and_truncates(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    tokens = encode_texts(tokenizer, ["jesus wept", "and the lord said unto moses"])
    assert tokens.shape == (2, 2, 8) and tokens.dtype == torch.long
    assert tokens[:, 1].tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [1] * 8]
    assert (tokens[0, 0, 4:] == tokenizer.pad_token_id).all()
    short = encode_texts(tokenizer, ["and the lord said unto moses"], max_length=4)
    assert short.shape == (1, 2, 4)
    with pytest.raises(TypeError, match=r"`texts` must be a non-empty sequence of strings"):
        encode_texts(tokenizer, "jesus wept")
    with pytest.raises(ValueError, match=r"`max_length` must be an integer >= 2; got 1"):
        encode_texts(tokenizer, ["amen"], max_length=1)


def test_build_errors():
    with pytest.raises(ValueError, match=r"`num_classes` must be an integer >= 2; got 1"):
        build_text_network(make_tiny_bert(n_layers=2), 1)
    with pytest.raises(TypeError, match=r"`encoder` must be a BERT-style model"):
        build_text_network(torch.nn.Linear(3, 3), 4)


def test_the_network_trains_the_encoder_it_wraps(tiny_bert):
    network = build_text_network(tiny_bert, 3)
    encoder_parameters = {
        id(p) for name, p in tiny_bert.named_parameters() if not name.startswith("pooler.")
    }
    assert encoder_parameters <= {id(p) for p in network.parameters()}
