"""Early-exit decoding on a tiny random Llama: equivalence, cache filling, batching."""

from __future__ import annotations

import itertools
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from exitguard.tasks.language.decode import EarlyExitLM, decayed_threshold  # noqa: E402


def _ragged_batch(lengths=(5, 9, 3, 7), *, seed=0, vocab=97):
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (n,), generator=generator) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return prompts, ids, mask


def _assert_greedy_generate(ours, model, ids, *, attention_mask=None):
    """``ours`` has the tokens of transformers' greedy ``generate`` and its logits (1e-4)."""
    reference = model.generate(
        ids,
        attention_mask=attention_mask,
        max_new_tokens=ours.tokens.shape[1],
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        eos_token_id=None,
    )
    assert torch.equal(ours.tokens, reference.sequences[:, ids.shape[1] :])
    torch.testing.assert_close(ours.logits, torch.stack(reference.logits, 1), atol=1e-4, rtol=0)


def test_never_exit_reproduces_generate_batch_one(tiny_llama, tiny_heads):
    prompt = torch.randint(3, 97, (1, 7), generator=torch.Generator().manual_seed(0))
    ours = EarlyExitLM(tiny_llama, tiny_heads).generate(
        prompt, max_new_tokens=12, threshold=math.inf, return_logits=True
    )
    assert ours.tokens.shape == (1, 12)
    _assert_greedy_generate(ours, tiny_llama, prompt)
    assert (ours.exits == ours.exits.new_full(ours.exits.shape, 2)).all()  # the final exit
    assert (ours.layers == 6).all()


def test_never_exit_reproduces_generate_left_padded_batch(tiny_llama):
    _, ids, mask = _ragged_batch()
    ours = EarlyExitLM(tiny_llama).generate(
        ids, attention_mask=mask, max_new_tokens=10, return_logits=True
    )
    assert ours.tokens.shape == (4, 10)
    _assert_greedy_generate(ours, tiny_llama, ids, attention_mask=mask)


@pytest.mark.parametrize("confidence", ["learned", "state", "softmax", "margin"])
@pytest.mark.parametrize("kv_fill", ["propagate", "recompute", "defer"])
def test_batch_equals_one_by_one(tiny_llama, tiny_heads, confidence, kv_fill):
    prompts, ids, mask = _ragged_batch()
    lm = EarlyExitLM(tiny_llama, tiny_heads)
    threshold = {"learned": 0.6, "state": 0.5, "softmax": 0.2, "margin": 0.1}[confidence]
    settings = dict(
        max_new_tokens=10,
        threshold=threshold,
        confidence=confidence,
        kv_fill=kv_fill,
        return_logits=True,
        decay=1.0,
    )
    batch = lm.generate(ids, attention_mask=mask, **settings)
    for row, prompt in enumerate(prompts):
        single = lm.generate(prompt[None], **settings)
        assert torch.equal(single.tokens[0], batch.tokens[row])
        assert torch.equal(single.exits[0], batch.exits[row])
        torch.testing.assert_close(single.logits[0], batch.logits[row], atol=1e-4, rtol=0)
        torch.testing.assert_close(single.cost[0], batch.cost[row])


def test_exits_are_mixed_and_monotone_in_threshold(tiny_llama, tiny_heads):
    _, ids, mask = _ragged_batch()
    lm = EarlyExitLM(tiny_llama, tiny_heads)
    depths = []
    for threshold in (math.inf, 0.9, 0.6, 0.3, 0.0):
        out = lm.generate(ids, attention_mask=mask, max_new_tokens=10, threshold=threshold)
        depths.append(out.layers[:, 1:].double().mean().item())
    assert depths[0] == 6
    assert depths[-1] == 2  # threshold 0: everything leaves at the first exit (after layer 1)
    assert 2 < depths[2] < 6  # a mixture of exits
    assert all(a >= b for a, b in itertools.pairwise(depths))


def test_threshold_grid_equals_separate_calls(tiny_llama, tiny_heads):
    _, ids, mask = _ragged_batch()
    lm = EarlyExitLM(tiny_llama, tiny_heads)
    grid = torch.tensor([math.inf, 0.8, 0.6, 0.0])
    together = lm.generate(ids, attention_mask=mask, max_new_tokens=8, threshold=grid)
    for r, threshold in enumerate(grid.tolist()):
        alone = lm.generate(ids, attention_mask=mask, max_new_tokens=8, threshold=threshold)
        assert torch.equal(alone.tokens, together.tokens[4 * r : 4 * (r + 1)])
        assert torch.equal(alone.exits, together.exits[4 * r : 4 * (r + 1)])


def _manual_kv(lm, layer_index, hidden, position):
    """Keys/values of one layer for one state (H,) at one position, via the layer's modules."""
    layer = lm.layers[layer_index]
    x = layer.input_layernorm(hidden[None, None])  # (1, 1, H)
    k = layer.self_attn.k_proj(x).view(1, 1, lm.n_kv, lm.head_dim).transpose(1, 2)
    v = layer.self_attn.v_proj(x).view(1, 1, lm.n_kv, lm.head_dim).transpose(1, 2)
    cos, sin = lm.rotary(x, torch.tensor([[position]]))
    cos, sin = cos[:, None], sin[:, None]
    half = lm.head_dim // 2
    rotated = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
    return (k * cos + rotated * sin)[0, :, 0], v[0, :, 0]  # (K, D) each


def test_state_propagation_fills_every_skipped_layer(tiny_llama, tiny_heads):
    """Each skipped layer's cache entry is its key/value projection of the exited state."""
    lm = EarlyExitLM(tiny_llama, tiny_heads)
    prompt = torch.randint(3, 97, (1, 5), generator=torch.Generator().manual_seed(3))
    out = lm.generate(prompt, max_new_tokens=6, threshold=0.0, return_cache=True)
    assert (out.exits[0, 1:] == 0).all()  # every decoded token left at exit 0 (after layer 1)
    keys, values = out.cache  # (L, 1, K, T, D)
    fed = torch.cat([prompt[0], out.tokens[0, :-1]])[None]  # (1, 10): all tokens fed back
    # Layers 0-1 ran for every token with exact caches, so the exited state at each slot is
    # the no-cache forward's state after layer 1.
    hidden = lm.hidden_states(fed)  # L x (1, 10, H)
    exited = hidden[1][0]  # (10, H)
    for slot in range(5, 10):
        for skipped in range(2, lm.n_layers):
            k, v = _manual_kv(lm, skipped, exited[slot], slot)
            torch.testing.assert_close(keys[skipped, 0, :, slot], k, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(values[skipped, 0, :, slot], v, atol=1e-5, rtol=1e-5)
        for run in range(2):
            state = lm.embed(fed[0, slot]) if run == 0 else hidden[run - 1][0, slot]
            k, v = _manual_kv(lm, run, state, slot)
            torch.testing.assert_close(keys[run, 0, :, slot], k, atol=1e-5, rtol=1e-5)
    assert (keys[:, 0, :, :10].abs().sum(-1) > 0).all()  # no layer left an empty entry


def test_propagation_routine_matches_projection(tiny_llama, tiny_heads):
    lm = EarlyExitLM(tiny_llama, tiny_heads)
    state = torch.randn(3, lm.hidden_size, generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([4, 9, 2])
    k_cache = torch.zeros(lm.n_layers, 3, lm.n_kv, 12, lm.head_dim)
    v_cache = torch.zeros_like(k_cache)
    cos, sin = lm._rope_tables(state[:, None], positions[:, None])
    lm._propagate(2, state, cos, sin, k_cache, v_cache, torch.arange(3), 7)
    assert (k_cache[:2] == 0).all()  # layers that ran are untouched
    assert (v_cache[:2] == 0).all()
    for skipped in range(2, lm.n_layers):
        for row in range(3):
            k, v = _manual_kv(lm, skipped, state[row], int(positions[row]))
            torch.testing.assert_close(k_cache[skipped, row, :, 7], k, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v_cache[skipped, row, :, 7], v, atol=1e-5, rtol=1e-5)


def test_propagate_differs_from_recompute_only_after_an_early_exit(tiny_llama, tiny_heads):
    """The cache modes agree until a token runs a layer that an earlier token skipped."""
    lm = EarlyExitLM(tiny_llama, tiny_heads)
    prompt = torch.randint(3, 97, (1, 6), generator=torch.Generator().manual_seed(0))
    common = dict(max_new_tokens=10, threshold=0.65, confidence="learned", return_logits=True)
    a = lm.generate(prompt, kv_fill="propagate", **common)
    b = lm.generate(prompt, kv_fill="recompute", **common)
    exits = a.exits[0].tolist()
    # The first token that goes deeper than an earlier generated token did: it reads the
    # cache entries that the two modes fill differently.
    first = next(t for t in range(2, len(exits)) if exits[t] > min(exits[1:t]))
    assert torch.equal(a.exits[0, :first], b.exits[0, :first])
    torch.testing.assert_close(a.logits[:, :first], b.logits[:, :first])
    assert (a.logits[0, first] - b.logits[0, first]).abs().max() > 1e-3
    assert (b.cost > a.cost).all()  # recomputing the cache costs the skipped layers


@pytest.mark.parametrize(("confidence", "threshold"), [("learned", 0.6), ("state", 0.9)])
def test_deferred_catch_up_equals_recompute(tiny_llama, tiny_heads, confidence, threshold):
    """Catching skipped layers up later gives the exact cache, as running them at once does."""
    _, ids, mask = _ragged_batch()
    lm = EarlyExitLM(tiny_llama, tiny_heads)
    kwargs = dict(
        attention_mask=mask, max_new_tokens=16, threshold=threshold, confidence=confidence
    )
    now = lm.generate(ids, kv_fill="recompute", return_logits=True, **kwargs)
    later = lm.generate(ids, kv_fill="defer", return_logits=True, **kwargs)
    assert 0 < (now.exits[:, 1:] < 2).double().mean() < 1  # a mixture of exits
    assert torch.equal(now.tokens, later.tokens)
    assert torch.equal(now.exits, later.exits)
    torch.testing.assert_close(now.logits, later.logits, atol=1e-4, rtol=0)
    assert (later.cost <= now.cost + 1e-9).all()  # never more compute than recomputing


def test_sampling_is_seeded(tiny_llama, tiny_heads):
    lm = EarlyExitLM(tiny_llama, tiny_heads)
    prompt = torch.randint(3, 97, (2, 4), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=10, threshold=0.6, do_sample=True, temperature=1.5, top_k=20)
    first = lm.generate(prompt, seed=1, **kwargs)
    assert torch.equal(first.tokens, lm.generate(prompt, seed=1, **kwargs).tokens)
    assert not torch.equal(first.tokens, lm.generate(prompt, seed=2, **kwargs).tokens)


def test_eos_stops_a_row_and_pads(tiny_llama):
    lm = EarlyExitLM(tiny_llama)
    prompt = torch.randint(3, 97, (1, 6), generator=torch.Generator().manual_seed(0))
    free = lm.generate(prompt, max_new_tokens=8)
    eos = int(free.tokens[0, 3])
    stopped = lm.generate(prompt, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    first = int((free.tokens[0] == eos).nonzero()[0])
    assert int(stopped.lengths[0]) == first + 1
    assert (stopped.tokens[0, first + 1 :] == 0).all()
    assert (stopped.exits[0, first + 1 :] == -1).all()


def test_decayed_threshold():
    assert decayed_threshold(0.8, step=0, decay=4.0, horizon=10) == pytest.approx(0.8)
    assert decayed_threshold(0.8, step=10, decay=4.0, horizon=10) == pytest.approx(
        0.8 * (0.9 + 0.1 * math.exp(-4.0))
    )
    assert decayed_threshold(0.8, step=5, decay=0.0, horizon=10) == 0.8
    assert math.isinf(decayed_threshold(math.inf, step=5, decay=1.0, horizon=10))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"confidence": "entropy"}, "`confidence` must be one of"),
        ({"kv_fill": "copy"}, "`kv_fill` must be one of"),
        ({"threshold": float("nan")}, "`threshold` must be a float in"),
        ({"max_new_tokens": 0}, "`max_new_tokens` must be a positive integer"),
        ({"decay": -1.0}, "`decay` must be a finite float >= 0"),
    ],
)
def test_bad_arguments_are_rejected(tiny_llama, tiny_heads, kwargs, match):
    lm = EarlyExitLM(tiny_llama, tiny_heads)
    with pytest.raises(ValueError, match=match):
        lm.generate(torch.tensor([[5, 6, 7]]), **kwargs)


def test_finite_threshold_needs_heads(tiny_llama):
    with pytest.raises(ValueError, match="needs exit heads"):
        EarlyExitLM(tiny_llama).generate(torch.tensor([[5, 6]]), threshold=0.5)


def test_a_calibrated_policy_stands_for_its_threshold(tiny_llama, tiny_heads):
    import numpy as np

    exitguard = pytest.importorskip("exitguard")
    if not hasattr(exitguard, "calibrate_table"):
        pytest.skip("risk core not available")
    policy = exitguard.calibrate_table(
        np.zeros((3, 50)), target_risk=0.1, procedure="crc", thresholds=[math.inf, 0.6, 0.0]
    )
    lm = EarlyExitLM(tiny_llama, tiny_heads)
    policy = lm.bind_policy(policy, confidence="learned")
    prompt = torch.tensor([[5, 6, 7, 8]])
    by_policy = lm.generate(prompt, max_new_tokens=6, threshold=policy)
    by_value = lm.generate(prompt, max_new_tokens=6, threshold=policy.threshold)
    assert torch.equal(by_policy.tokens, by_value.tokens)
    assert torch.equal(by_policy.exits, by_value.exits)


@pytest.mark.parametrize("bad", [1.5, -0.5, float("nan")])
def test_thresholds_outside_the_unit_interval_are_refused(tiny_llama, tiny_heads, bad):
    """The decoder shares the core's threshold check (it used to accept 1.5)."""
    lm = EarlyExitLM(tiny_llama, tiny_heads)
    prompt = torch.randint(3, 97, (1, 4), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"`threshold` must be a float in \[0, 1\] or inf"):
        lm.generate(prompt, max_new_tokens=2, threshold=bad)
    with pytest.raises(ValueError, match=r"`threshold` must be a float in \[0, 1\] or inf"):
        lm.generate(prompt, max_new_tokens=2, threshold=[0.5, bad])


def test_settings_object_and_keywords_agree(tiny_llama, tiny_heads):
    from exitguard.tasks.language.decode import DecodingSettings

    lm = EarlyExitLM(tiny_llama, tiny_heads)
    prompt = torch.randint(3, 97, (1, 5), generator=torch.Generator().manual_seed(2))
    settings = DecodingSettings(max_new_tokens=6, confidence="softmax", kv_fill="defer")
    a = lm.generate(prompt, threshold=0.3, settings=settings)
    b = lm.generate(prompt, threshold=0.3, max_new_tokens=6, confidence="softmax", kv_fill="defer")
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.exits, b.exits)
    c = lm.generate(prompt, threshold=0.3, settings=settings, kv_fill="recompute")  # override
    assert torch.equal(a.tokens, c.tokens)  # defer and recompute: the same exact cache
    with pytest.raises(ValueError, match="`kv_fill` must be one of"):
        DecodingSettings(kv_fill="lazy")
    with pytest.raises(ValueError, match="`max_new_tokens` must be a positive integer"):
        lm.generate(prompt, max_new_tokens=0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        lm.generate(prompt, max_tokens=3)
