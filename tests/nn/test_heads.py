"""Exit heads: their computation written out, pooling, reset, factory arguments, errors."""

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
def test_classifier_head_computes_pool_norm_hidden_linear(input_format, pool, shape):
    """The head's output against the computation written out: pool, layer norm, GELU layer, fc."""
    head = ClassifierHead(8, 3, input_format=input_format, pool=pool, hidden_features=6).eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if input_format == "NCHW":
        pooled = x.mean(dim=(2, 3)) if pool == "avg" else x.amax(dim=(2, 3))
    elif input_format == "NLC":
        pooled = {"avg": x.mean(dim=1), "max": x.amax(dim=1), "cls": x[:, 0]}[pool]
    else:
        pooled = x
    normed = torch.nn.functional.layer_norm(
        pooled, (8,), head.norm.weight, head.norm.bias, head.norm.eps
    )
    hidden = torch.nn.functional.gelu(normed @ head.hidden[0].weight.T + head.hidden[0].bias)
    expected = hidden @ head.fc.weight.T + head.fc.bias  # (4, 3)
    torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-6)


def test_dense_head_computes_per_pixel_then_upsamples():
    head = DenseHead(4, 3, hidden_channels=5, out_size=(6, 6)).eval()
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    hidden = torch.relu(
        torch.einsum("bchw,kc->bkhw", x, head.hidden[0].weight[:, :, 0, 0])
        + head.hidden[0].bias[None, :, None, None]
    )  # (2, 5, 3, 3)
    low = torch.einsum("bchw,kc->bkhw", hidden, head.fc.weight[:, :, 0, 0])
    low = low + head.fc.bias[None, :, None, None]  # (2, 3, 3, 3)
    expected = torch.nn.functional.interpolate(
        low, size=(6, 6), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-6)


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
