"""Blocks keep their memory layout on the way to a worker (torch picks kernels by it)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from exitguard.distributed.jobs import restore_layout


@pytest.mark.parametrize(
    "make",
    [
        lambda x: x,  # default C strides
        lambda x: x[np.arange(4)],  # numpy indexing: the size-1 axis gets stride 4
        lambda x: np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2),  # NHWC
        lambda x: np.asfortranarray(x),
    ],
)
def test_a_dense_block_comes_back_with_its_strides(make, rng):
    base = rng.random((4, 1, 8, 8)).astype(np.float32)
    base = base.transpose(0, 2, 3, 1).copy().transpose(0, 3, 1, 2)
    block = make(base)
    sent = np.ascontiguousarray(block)  # what Ray delivers: default strides, read-only
    sent.flags.writeable = False
    got = restore_layout(sent, block.strides)
    assert got.strides == block.strides and got.flags.writeable
    assert np.array_equal(got, block)
    got[0, 0, 0, 0] = -1.0  # a copy: the sent array is untouched
    assert sent[0, 0, 0, 0] == block[0, 0, 0, 0]


def test_a_strided_block_comes_back_dense_and_writeable(rng):
    block = rng.random((4, 3, 8, 8))[:, :, ::2]
    sent = np.ascontiguousarray(block)
    sent.flags.writeable = False
    got = restore_layout(sent, block.strides)
    assert got.flags.c_contiguous and got.flags.writeable and np.array_equal(got, block)
