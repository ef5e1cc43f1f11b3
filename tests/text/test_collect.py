"""Loss and per-sentence FLOPs tables of the text network, and its timing helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.text.conftest import make_network, make_tiny_bert, make_tokens, mixed_lengths

torch = pytest.importorskip("torch")

from exitguard.calibration import build_table  # noqa: E402
from exitguard.risk.exits import exit_indices  # noqa: E402
from exitguard.tasks.text.collect import (  # noqa: E402
    collect_text,
    interleaved_seconds,
    text_tables,
    time_text,
)


@pytest.fixture(scope="module")
def collected():
    encoder = make_tiny_bert()
    network = make_network(encoder, num_classes=4)
    tokens = make_tokens(mixed_lengths(40, seed=5), seed=5)
    labels = np.random.default_rng(0).integers(0, 4, 40)
    return encoder, network, tokens, collect_text(network, tokens, labels, batch_size=16)


def test_collected_outputs_are_the_networks(collected):
    _, network, tokens, data = collected
    with torch.inference_mode():
        logits = network(tokens)
    # Batches of 16 are trimmed to their own longest sentence: equal up to rounding.
    np.testing.assert_allclose(data.outputs.logits, logits.numpy(), rtol=1e-4, atol=1e-5)
    assert data.lengths.tolist() == tokens[:, 1].sum(1).tolist()
    assert data.flops_to_exit.shape == (40, network.n_exits)
    part = data.subset(np.array([3, 1]))
    assert part.lengths.tolist() == data.lengths[[3, 1]].tolist()
    np.testing.assert_array_equal(part.probs, data.probs[[3, 1]])


@pytest.mark.parametrize("risk", ["prediction_gap", "prediction_consistency"])
def test_cost_is_each_sentences_flops_to_its_exit(collected, risk):
    *_, data = collected
    tables = text_tables(data, risk=risk, confidence="margin", seed=0)
    reference = build_table(data.probs, data.labels, risk=risk, confidence="margin", rng=0)
    np.testing.assert_array_equal(tables["losses"], reference["losses"])
    np.testing.assert_array_equal(tables["exits"], reference["exits"])
    assert math.isinf(tables["thresholds"][0])
    np.testing.assert_array_equal(tables["cost"][0], data.flops_full)  # never exit: no heads
    for k in (1, 40, 100):  # a few rows, by a plain loop over the samples
        expected = [data.flops_to_exit[i, tables["exits"][k, i]] for i in range(40)]
        np.testing.assert_array_equal(tables["cost"][k], expected)
    exits = exit_indices(data.outputs.confidences, tables["thresholds"][1:])
    if data.outputs.measure == "margin":
        np.testing.assert_array_equal(exits, tables["exits"][1:])


def test_time_text_reports_every_run(collected):
    encoder, network, tokens, _ = collected
    timing = time_text(
        network,
        encoder,
        tokens[:8],
        {"policy": 0.5, "no early exit": math.inf},
        batch_size=4,
        repeats=1,
        sort_by_length=True,
    )
    assert timing["sentences"] == 8 and timing["batch_size"] == 4
    for name in ("transformers", "policy", "no early exit"):
        assert timing[name] > 0
    assert timing["policy speed-up"] == pytest.approx(timing["policy"] / timing["transformers"])


def test_interleaved_seconds_takes_turns():
    calls = []
    result = interleaved_seconds(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=2
    )
    assert calls == ["a", "b"] * 3  # a warm-up round, then two timed rounds
    assert set(result) == {"a", "b"}
    with pytest.raises(ValueError, match=r"`repeats` must be a positive integer; got 0"):
        interleaved_seconds({"a": lambda: None}, repeats=0)
