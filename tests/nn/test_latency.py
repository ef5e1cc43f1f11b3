"""Latency profiles: hand-made profiles against hand computations, and a real measurement."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from exitguard.nn.latency import LatencyProfile, profile_latency  # noqa: E402


def hand_profile() -> LatencyProfile:
    # Two batch sizes, three exits; ms per call.
    return LatencyProfile(
        batch_sizes=(10, 100),
        stage_ms=((2.0, 1.0, 1.0), (11.0, 6.0, 6.0)),
        head_ms=((0.2, 0.2, 0.0), (1.1, 1.1, 0.0)),
        stage_spread_ms=((0.1,) * 3, (0.2,) * 3),
        head_spread_ms=((0.0,) * 3, (0.0,) * 3),
        compaction_ms=(0.05, 0.3),
        threads=2,
        torch_version="x",
        machine="y",
        repeats=3,
        warmup=1,
    )


def test_per_sample_costs_by_hand():
    profile = hand_profile()
    # At B = 100: per-sample shares (11 + 1.1)/100, (6 + 1.1)/100, (6 + 0)/100, compaction 0.003.
    expected = np.cumsum([0.121, 0.071, 0.06]) + 0.003 * np.arange(3)
    np.testing.assert_allclose(profile.exit_ms(100), expected)
    np.testing.assert_allclose(
        profile.cost_table([[0, 2], [1, 1]], batch_size=100), expected[[[0, 2], [1, 1]]]
    )
    assert profile.full_ms(100) == pytest.approx((11 + 6 + 6 + 0) / 100)
    # Interpolated at B = 55 (halfway), and linear from 0 below the smallest size.
    np.testing.assert_allclose(profile._at(profile.stage_ms, 55), [6.5, 3.5, 3.5])
    np.testing.assert_allclose(profile._at(profile.stage_ms, 5), [1.0, 0.5, 0.5])


def test_batch_time_reads_each_stage_at_the_samples_that_reach_it():
    profile = hand_profile()
    exits = np.array([0] * 90 + [2] * 10)  # 90 leave at exit 0; 10 run to the end
    # Stage 0 and head 0 on 100, stages 1, 2 and head 1 on 10, head 2 (0 ms), one compaction
    # of 100 after exit 0 (exit 1 loses nobody: no compaction there).
    expected = 11.0 + 1.1 + 1.0 + 0.2 + 1.0 + 0.0 + 0.3
    assert profile.batch_ms(exits) == pytest.approx(expected)
    assert profile.batch_ms(np.zeros(100, dtype=int)) == pytest.approx(11.0 + 1.1)


def test_round_trip(tmp_path):
    profile = hand_profile()
    path = profile.save(tmp_path / "profile.json")
    assert LatencyProfile.load(path) == profile
    with pytest.raises(ValueError, match="not an exitguard latency profile"):
        LatencyProfile.from_dict({"schema": "other"})


def test_a_real_profile(cnn_network, images):
    profile = profile_latency(cnn_network, images(8), batch_sizes=(1, 8), repeats=3, warmup=1)
    assert profile.batch_sizes == (1, 8) and profile.n_exits == cnn_network.n_exits
    assert all(t > 0 for row in profile.stage_ms for t in row)
    assert profile.threads == torch.get_num_threads()
    assert len(profile.copy_ms) == 2 and all(t > 0 for t in profile.copy_ms)
    assert np.all(np.diff(profile.exit_ms(8)) > 0)  # later exits cost more
    with pytest.raises(ValueError, match="`batch_sizes` must be positive"):
        profile_latency(cnn_network, images(2), batch_sizes=(0,))


def test_resizing_is_charged_to_the_samples_that_leave():
    import dataclasses

    profile = dataclasses.replace(hand_profile(), resize_ms=(0.5, 2.0))
    # At B = 100 every leaver pays 2.0 / 100 once, at whatever exit it leaves.
    expected = np.cumsum([0.121, 0.071, 0.06]) + 0.003 * np.arange(3) + 0.02
    np.testing.assert_allclose(profile.exit_ms(100), expected)
    assert profile.full_ms(100) == pytest.approx((11 + 6 + 6) / 100 + 0.02)
    # 90 resized at exit 0 (read at B = 90: 0.5 + 1.5 * 80 / 90 ms) and 10 at exit 2 (0.5 ms).
    exits = np.array([0] * 90 + [2] * 10)
    base = 11.0 + 1.1 + 1.0 + 0.2 + 1.0 + 0.0 + 0.3
    resize = (0.5 + 1.5 * 80 / 90) + 0.5
    assert profile.batch_ms(exits) == pytest.approx(base + resize)
    assert LatencyProfile.from_dict(profile.to_dict()) == profile
    old = {k: v for k, v in hand_profile().to_dict().items() if k != "resize_ms"}
    assert LatencyProfile.from_dict(old).resize_ms == ()  # profiles saved before it still load


def test_outputs_are_copied_only_when_a_batch_leaves_in_groups():
    import dataclasses

    profile = dataclasses.replace(hand_profile(), copy_ms=(0.4, 1.3))
    plain = hand_profile()
    # 90 leave at exit 0 and 10 at exit 2: two copies, read at 90 (0.4 + 0.9 * 80 / 90 ms)
    # and at 10 (0.4 ms).
    exits = np.array([0] * 90 + [2] * 10)
    copies = (0.4 + 0.9 * 80 / 90) + 0.4
    assert profile.batch_ms(exits) == pytest.approx(plain.batch_ms(exits) + copies)
    together = np.full(100, 2)  # the whole batch leaves at once: no copy
    assert profile.batch_ms(together) == pytest.approx(plain.batch_ms(together))
    assert LatencyProfile.from_dict(profile.to_dict()) == profile


def test_measured_speedup_side_by_side(cnn_network, images):
    from exitguard.nn import count_flops
    from exitguard.nn.latency import measure_speedup

    x = images(32)
    _, conf = cnn_network.exit_confidences(x)
    threshold = float(conf[:, 0].median())
    profile = profile_latency(cnn_network, x, batch_sizes=(1, 16), repeats=3, warmup=1)
    flops = count_flops(cnn_network, x[:1])
    result = measure_speedup(
        cnn_network, x, threshold, batch_size=16, repeats=3, profile=profile, flops=flops
    )
    exits = torch.cat([cnn_network.infer(b, threshold).exits for b in x.split(16)]).numpy()
    assert result.mean_exit == pytest.approx(exits.mean())
    assert result.flops_speedup == pytest.approx(flops.full * 32 / flops.to_exit[exits].sum())
    assert result.measured_speedup == pytest.approx(result.full_ms / result.early_ms)
    assert result.predicted_speedup > 0 and result.n == 32 and result.batch_size == 16
    never = measure_speedup(cnn_network, x, float("inf"), batch_size=16, repeats=1, flops=flops)
    assert never.flops_speedup == pytest.approx(1.0) and never.predicted_speedup is None
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer; got 0"):
        measure_speedup(cnn_network, x, threshold, batch_size=0)


def test_measured_speedup_under_a_threshold_vector(cnn_network, images):
    from exitguard.nn import count_flops
    from exitguard.nn.latency import measure_speedup

    x = images(32)
    flops = count_flops(cnn_network, x[:1])
    vector = (float("inf"),) * (cnn_network.n_exits - 1)
    never = measure_speedup(cnn_network, x, vector, batch_size=16, repeats=1, flops=flops)
    assert never.flops_speedup == pytest.approx(1.0) and never.mean_exit == cnn_network.n_exits - 1
    first = (0.0,) + (float("inf"),) * (cnn_network.n_exits - 2)
    all_first = measure_speedup(cnn_network, x, first, batch_size=16, repeats=1, flops=flops)
    assert all_first.mean_exit == 0.0
    assert all_first.flops_speedup == pytest.approx(flops.full / flops.to_exit[0])


def test_a_slow_resize_is_charged_to_resizing_not_to_compaction(images):
    import time

    from torch import nn

    from exitguard.nn import DenseHead, EarlyExitNetwork

    class SlowResize(nn.Module):
        def forward(self, logits):
            time.sleep(0.02)
            return nn.functional.interpolate(logits, scale_factor=2, mode="bilinear")

    stages = [nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 3, padding=1)]
    network = EarlyExitNetwork(
        stages, [DenseHead(4, 3), DenseHead(4, 3)], input_shape=(3, 8, 8), resize=SlowResize()
    )
    profile = profile_latency(network, images(4, shape=(3, 8, 8)), batch_sizes=(4,), repeats=3)
    assert profile.resize_ms[0] >= 20.0  # the resize with what infer does after it
    assert profile.compaction_ms[0] < 20.0  # compaction was once recorded as the resize time


def test_the_profile_serves_the_example_in_its_own_memory_format(images):
    from torch import nn

    from exitguard.nn import ClassifierHead, EarlyExitNetwork

    class Recorder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.layouts: set[bool] = set()

        def forward(self, x):
            self.layouts.add(x.is_contiguous(memory_format=torch.channels_last))
            return self.conv(x)

    recorder = Recorder()
    stages = [recorder, nn.Conv2d(4, 4, 1)]
    network = EarlyExitNetwork(
        stages, [ClassifierHead(4, 3), ClassifierHead(4, 3)], input_shape=(3, 8, 8)
    )
    example = images(4, shape=(3, 8, 8)).contiguous(memory_format=torch.channels_last)
    profile_latency(network, example, batch_sizes=(1, 10), repeats=1, warmup=0)
    assert recorder.layouts == {True}  # batch 10 repeats the 4 examples, still channels-last
