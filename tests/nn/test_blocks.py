"""The project's building blocks: bilinear resizing as matrix products, the finiteness check."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
from torch.nn import functional as F  # noqa: E402

from exitguard.nn.blocks import BilinearResize, interpolation_matrix  # noqa: E402
from exitguard.nn.network import all_finite  # noqa: E402


@pytest.mark.parametrize(
    ("size_in", "size_out"),
    [((16, 16), (64, 64)), ((7, 5), (64, 33)), ((64, 64), (16, 16)), ((10, 13), (7, 3)),
     ((1, 1), (4, 4)), ((16, 16), (16, 16))],
)  # fmt: skip
def test_resize_equals_torch_bilinear(size_in, size_out):
    x = torch.randn(
        3, 11, *size_in, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    expected = F.interpolate(x, size=size_out, mode="bilinear", align_corners=False)
    torch.testing.assert_close(BilinearResize(size_out)(x), expected, rtol=0, atol=1e-12)
    x32 = x.float()  # float32 to float rounding, in any memory layout
    expected32 = F.interpolate(x32, size=size_out, mode="bilinear", align_corners=False)
    for layout in (x32, x32.contiguous(memory_format=torch.channels_last)):
        torch.testing.assert_close(BilinearResize(size_out)(layout), expected32)


def test_interpolation_matrix_by_hand():
    # 2 -> 4: outputs sample the input at -0.25 (clamped to 0), 0.25, 0.75, 1.25 (edge held).
    expected = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    torch.testing.assert_close(interpolation_matrix(2, 4), expected)
    rows = interpolation_matrix(5, 17, dtype=torch.float64).sum(dim=1)
    torch.testing.assert_close(rows, torch.ones(17, dtype=torch.float64))  # convex weights


def test_resize_has_no_state_and_checks_its_arguments():
    resize = BilinearResize((8, 8))
    assert resize.state_dict() == {}  # the matrices are rebuilt, never saved
    assert "size=(8, 8)" in repr(resize)
    with pytest.raises(ValueError, match=r"`size` must be two positive integers.*got \(0, 4\)"):
        BilinearResize((0, 4))
    with pytest.raises(ValueError, match=r"`x` must have two spatial axes last.*got \(5,\)"):
        resize(torch.zeros(5))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", [0, 1, 17, -1])
def test_all_finite_finds_every_non_finite_value(bad, where):
    x = torch.randn(4, 11, 16, 16)
    assert all_finite(x) and all_finite(x[:0])
    x.view(-1)[where] = bad
    assert not all_finite(x)
    assert not all_finite(x.permute(0, 2, 3, 1))  # any layout
