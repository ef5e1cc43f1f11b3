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
    assert np.all(np.diff(profile.exit_ms(8)) > 0)  # later exits cost more
    with pytest.raises(ValueError, match="`batch_sizes` must be positive"):
        profile_latency(cnn_network, images(2), batch_sizes=(0,))
