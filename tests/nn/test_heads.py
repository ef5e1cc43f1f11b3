"""Exit heads: shapes, pooling, reset, factory arguments, errors."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from exitguard.nn import ClassifierHead, DenseHead  # noqa: E402


@pytest.mark.parametrize(
    ("input_format", "pool", "shape"),
    [
        ("NCHW", "avg", (4, 8, 5, 5)),
        ("NCHW", "max", (4, 8, 5, 5)),
        ("NLC", "avg", (4, 7, 8)),
        ("NLC", "cls", (4, 7, 8)),
        ("NLC", "max", (4, 7, 8)),
        ("NC", None, (4, 8)),
    ],
)
def test_classifier_head_shapes(input_format, pool, shape):
    head = ClassifierHead(8, 3, input_format=input_format, pool=pool, hidden_features=6)
    assert head(torch.randn(shape)).shape == (4, 3)


def test_cls_pooling_reads_the_first_token():
    head = ClassifierHead(8, 3, input_format="NLC", pool="cls", norm=False)
    tokens = torch.randn(2, 5, 8)
    changed = tokens.clone()
    changed[:, 1:] = 0
    torch.testing.assert_close(head(tokens), head(changed))


def test_reset_and_factory_arguments():
    head = ClassifierHead(8, 3, dtype=torch.float64)
    head.reset(7)
    assert head.num_classes == 7 and head.fc.weight.dtype == torch.float64
    dense = DenseHead(8, 3, out_size=(10, 10))
    dense.reset(2)
    assert dense(torch.randn(1, 8, 5, 5)).shape == (1, 2, 10, 10)


def test_dense_head_keeps_resolution_by_default():
    assert DenseHead(4, 6, hidden_channels=5)(torch.randn(2, 4, 3, 3)).shape == (2, 6, 3, 3)


def test_head_errors():
    with pytest.raises(ValueError, match=r"`pool` must be one of 'avg', 'max' for input_format"):
        ClassifierHead(8, 3, pool="cls")
    with pytest.raises(ValueError, match=r"`input_format` must be one of 'NCHW', 'NLC', 'NC'"):
        ClassifierHead(8, 3, input_format="NHWC")
    with pytest.raises(ValueError, match=r"`num_classes` must be a positive integer; got 0"):
        ClassifierHead(8, 0)
    with pytest.raises(ValueError, match=r"`drop_rate` must be a float in \[0, 1\); got 1"):
        ClassifierHead(8, 3, drop_rate=1)
    with pytest.raises(ValueError, match=r"expects a 4-D input; got shape \(2, 8\)"):
        ClassifierHead(8, 3)(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"`out_size` must be two positive integers"):
        DenseHead(8, 3, out_size=(4,))
    with pytest.raises(ValueError, match=r"DenseHead expects a \(B, C, H, W\) input"):
        DenseHead(8, 3)(torch.randn(2, 8))
