"""FLOPs per stage and head, policy cost, and the agreement with torch's counter."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from exitguard.nn import count_flops, flop_counter  # noqa: E402
from exitguard.risk.exits import exit_indices  # noqa: E402


def test_cnn_flops_by_hand(cnn_network):
    table = count_flops(cnn_network)
    conv = lambda cin, cout, hw: 2 * cin * cout * 9 * hw * hw  # noqa: E731
    assert table.stage[0] == conv(3, 8, 16) + conv(8, 8, 16)
    assert table.stage[1] == conv(8, 16, 8) + conv(16, 16, 8)
    assert table.stage[2] == conv(16, 32, 4) + conv(32, 32, 4) + 2 * 32 * 5  # with the fc
    assert table.head == (2 * 8 * 5, 2 * 16 * 5, 0)  # the heads are counted
    assert table.full == sum(table.stage)
    assert table.input_shape == (3, 16, 16)


@pytest.mark.parametrize("model", ["cnn", "vit"])
def test_flops_grow_across_exits(model, cnn_network, vit_network):
    table = count_flops(cnn_network if model == "cnn" else vit_network)
    assert np.all(np.diff(table.to_exit) > 0)
    assert all(flops > 0 for flops in table.head[:-1])
    assert table.to_exit[-1] == table.full + sum(table.head[:-1])


def test_attention_is_counted_on_cpu(vit_network):
    table = count_flops(vit_network)
    tokens, dim, hidden = 17, 16, 32
    linear = 2 * tokens * (dim * 3 * dim + dim * dim + 2 * dim * hidden)
    attention = 2 * 2 * tokens * tokens * dim
    assert table.stage[1] == linear + attention  # one block, attention included
    q = torch.randn(1, 2, tokens, 8)
    with flop_counter() as counter:
        F.scaled_dot_product_attention(q, q, q)
    assert counter.get_total_flops() == 2 * 2 * 2 * tokens * tokens * 8


@pytest.mark.parametrize("model", ["cnn", "vit"])
def test_expected_flops_match_the_counter_on_a_mixed_batch(model, cnn_network, vit_network, images):
    network = cnn_network if model == "cnn" else vit_network
    table = count_flops(network)
    x = images(40, seed=11)
    _, conf = network.exit_confidences(x)
    threshold = float(np.quantile(conf[:, 0].numpy(), 0.6))
    result = network.infer(x, threshold)
    assert sum(count > 0 for count in result.exit_counts) >= 2  # really mixed
    with flop_counter() as counter:
        network.infer(x, threshold)
    assert counter.get_total_flops() == table.cost(result.exits.numpy()).sum()
    assert table.expected(result.exits.numpy()) == counter.get_total_flops() / 40
    with flop_counter() as counter:
        network.infer(x, math.inf)
    assert counter.get_total_flops() == 40 * table.full
    assert table.expected([], threshold=math.inf) == table.full


def test_cost_table_for_the_risk_core(cnn_network, images):
    table = count_flops(cnn_network)
    _, conf = cnn_network.exit_confidences(images(30))
    grid = np.array([math.inf, 0.9, 0.5, 0.0])
    exits = exit_indices(conf.numpy(), grid)  # (4, 30)
    cost = table.cost_table(exits, thresholds=grid)
    assert cost.shape == (4, 30) and cost.dtype == np.float64
    assert np.all(cost[0] == table.full)  # never-exit: no intermediate heads
    assert np.all(cost[-1] == table.to_exit[0])  # threshold 0: everyone at exit 0
    assert np.array_equal(table.cost_table(exits)[0], np.full(30, float(table.to_exit[-1])))


def test_cost_errors(cnn_network):
    table = count_flops(cnn_network)
    out_of_range = r"`exits` must hold exit indices in \[0, 2\] \(3 exits\); got values in \[0, 3\]"
    with pytest.raises(ValueError, match=out_of_range):
        table.cost([0, 3])
    with pytest.raises(TypeError, match=r"`exits` must hold integer exit indices; got dtype float"):
        table.cost([0.5])
    with pytest.raises(ValueError, match=r"`exits` must be 2-D \(K, n\); got shape \(2,\)"):
        table.cost_table([0, 1])
    with pytest.raises(ValueError, match=r"`thresholds` must have shape \(1,\) to match"):
        table.cost_table([[0, 1]], thresholds=[1.0, 0.5])


def test_count_needs_a_shape(cnn_network, images):
    cnn_network.input_shape = (3, None, None)
    with pytest.raises(ValueError, match=r"`example_input` is needed"):
        count_flops(cnn_network)
    assert count_flops(cnn_network, images(2)).input_shape == (3, 16, 16)
    assert (
        count_flops(cnn_network, images(1, shape=(3, 8, 8))).stage[0]
        < count_flops(cnn_network, images(1)).stage[0]
    )


def test_the_resize_of_a_dense_network_is_paid_once_at_every_exit():
    from exitguard.nn import BilinearResize, DenseHead, EarlyExitNetwork

    stages = [torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.nn.Conv2d(4, 4, 1)]
    heads = [DenseHead(4, 5), DenseHead(4, 5)]
    plain = count_flops(EarlyExitNetwork(stages, heads, input_shape=(3, 16, 12)))
    dense = count_flops(
        EarlyExitNetwork(stages, heads, input_shape=(3, 16, 12), resize=BilinearResize((16, 12)))
    )
    # (8, 6) -> (16, 12) for 5 classes: (16 x 8) @ (8 x 6), then (16 x 6) @ (6 x 12).
    assert dense.output == 5 * 2 * (16 * 8 * 6 + 16 * 6 * 12)
    assert plain.output == 0
    np.testing.assert_array_equal(dense.to_exit, plain.to_exit + dense.output)
    assert dense.full == plain.full + dense.output
    assert dense.to_dict()["output"] == dense.output
