"""Token-level early exit under threshold vectors: one threshold per exit, disabled exits."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from exitguard.policy import ExitPolicy  # noqa: E402
from exitguard.tasks.language.decode import EarlyExitLM  # noqa: E402
from tests.language.test_decode import _ragged_batch  # noqa: E402


def test_a_constant_vector_is_the_scalar_and_a_grid_of_vectors_is_separate_calls(
    tiny_llama, tiny_heads
):
    _, ids, mask = _ragged_batch()
    lm = EarlyExitLM(tiny_llama, tiny_heads)
    width = lm.n_exits - 1
    scalar = lm.generate(ids, attention_mask=mask, max_new_tokens=8, threshold=0.6, decay=2.0)
    vector = lm.generate(
        ids, attention_mask=mask, max_new_tokens=8, threshold=torch.full((1, width), 0.6), decay=2.0
    )
    assert torch.equal(scalar.tokens, vector.tokens) and torch.equal(scalar.exits, vector.exits)
    grid = torch.tensor([[math.inf] * width, [0.0] + [math.inf] * (width - 1), [0.6] * width])
    together = lm.generate(ids, attention_mask=mask, max_new_tokens=8, threshold=grid)
    for r in range(3):
        alone = lm.generate(ids, attention_mask=mask, max_new_tokens=8, threshold=grid[r : r + 1])
        assert torch.equal(alone.tokens, together.tokens[4 * r : 4 * (r + 1)])
        assert torch.equal(alone.exits, together.exits[4 * r : 4 * (r + 1)])


def test_disabled_exits_are_never_taken(tiny_llama, tiny_heads):
    _, ids, mask = _ragged_batch()
    lm = EarlyExitLM(tiny_llama, tiny_heads)
    width = lm.n_exits - 1
    for disabled in range(width):
        vector = torch.zeros((1, width), dtype=torch.float64)
        vector[0, : disabled + 1] = math.inf  # exits 0..disabled off, the next one fires always
        out = lm.generate(ids, attention_mask=mask, max_new_tokens=6, threshold=vector)
        taken = out.exits[:, 1:][out.exits[:, 1:] >= 0]
        expected = disabled + 1 if disabled + 1 < width else lm.n_exits - 1
        assert set(taken.tolist()) == {expected}


def test_a_vector_policy_stands_for_its_thresholds(tiny_llama, tiny_heads):
    lm = EarlyExitLM(tiny_llama, tiny_heads)
    width = lm.n_exits - 1
    policy = ExitPolicy.from_thresholds([math.inf] + [0.5] * (width - 1), n_exits=lm.n_exits)
    policy = lm.bind_policy(policy, confidence="learned")
    prompt = torch.tensor([[5, 6, 7, 8]])
    by_policy = lm.generate(prompt, max_new_tokens=6, threshold=policy)
    by_value = lm.generate(
        prompt, max_new_tokens=6, threshold=torch.tensor([policy.exit_thresholds().tolist()])
    )
    assert torch.equal(by_policy.tokens, by_value.tokens)
    assert torch.equal(by_policy.exits, by_value.exits)
    with pytest.raises(ValueError, match=r"one threshold per exit but the last"):
        lm.generate(prompt, max_new_tokens=2, threshold=torch.zeros((1, width + 1)))
