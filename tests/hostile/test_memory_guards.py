"""Work that cannot fit in memory is refused before anything is allocated."""

import time
import tracemalloc
import warnings

import numpy as np
import pytest

from exitguard import build_table, calibrate_table, evaluate
from exitguard._files import read_npz
from exitguard._memory import MemoryLimitError, memory_limit
from exitguard.risk import procedures
from tests.hostile.conftest import npy_bytes, write_zip


def test_an_npz_header_claiming_terabytes_is_refused_from_its_header(tmp_path):
    header = {"descr": "<f8", "fortran_order": False, "shape": (10**7, 10**7)}
    path = write_zip(tmp_path / "big.npz", {"losses.npy": npy_bytes(header, b"\0" * 64)})
    start = time.perf_counter()
    with pytest.raises(MemoryLimitError, match=r"would need about 727\.6 TiB of memory"):
        read_npz(path)
    assert time.perf_counter() - start < 5  # refused from the header, nothing read


def test_huge_evaluations_are_refused_with_the_estimate():
    with pytest.raises(MemoryLimitError, match=r"trials=1000000000 .* above the limit of"):
        evaluate(np.zeros((3, 40)), trials=10**9, n_cal=10)


def test_the_limit_can_be_set(monkeypatch):
    monkeypatch.setenv("EXITGUARD_MEMORY_LIMIT", "1M")
    assert memory_limit()[0] == 1 << 20
    with pytest.raises(MemoryLimitError, match=r"\$EXITGUARD_MEMORY_LIMIT to change it"):
        build_table(np.full((2000, 4, 3), 1 / 3), np.zeros(2000, dtype=int))
    monkeypatch.setenv("EXITGUARD_MEMORY_LIMIT", "lots")
    with pytest.raises(ValueError, match="must be a number of bytes"):
        memory_limit()


def test_wsr_chunks_give_the_same_answer(monkeypatch, rng):
    table = (rng.random((30, 500)) < np.linspace(0, 0.3, 30)[:, None]).astype(float)
    table[0] = 0
    eps = np.array([0.05, 0.1])
    whole = procedures.statistics(table, eps, procedure="ucb-wsr", delta=0.1, loss_bound=1.0)
    monkeypatch.setattr(procedures, "_WSR_CHUNK_ELEMENTS", 700)  # one row at a time
    chunked = procedures.statistics(table, eps, procedure="ucb-wsr", delta=0.1, loss_bound=1.0)
    np.testing.assert_array_equal(whole, chunked)


def test_wsr_calibration_peaks_near_twice_the_table(rng):
    """The table read in its random order, plus a bounded working set (was about 6x)."""
    n = 60_000
    start = rng.integers(1, 400, size=n)
    table = (np.arange(60)[:, None] >= start[None, :]).astype(float)  # 28.8 MB
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            calibrate_table(table, target_risk=0.1, procedure="ucb-wsr", seed=0)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < 2.5 * table.nbytes
