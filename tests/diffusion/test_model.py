"""The denoiser: shapes, the early-exit step, FLOPs accounting and input checks."""

from __future__ import annotations

import math
import re

import pytest

torch = pytest.importorskip("torch")

from exitguard.tasks.diffusion.model import (  # noqa: E402
    Denoiser,
    DenoiserConfig,
    exit_flops,
    patchify,
    unpatchify,
)


def test_patchify_round_trip():
    images = torch.randn(3, 2, 8, 8)
    tokens = patchify(images, 2)
    assert tokens.shape == (3, 16, 8)
    assert torch.equal(unpatchify(tokens, channels=2, patch_size=2), images)
    # Patch (0, 1) holds columns 2..3 of rows 0..1.
    assert torch.equal(tokens[0, 1].view(2, 2, 2), images[0, :, 0:2, 2:4])


def test_forward_shapes_and_confidence(tiny_model):
    out = tiny_model(torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 7, 11]))
    assert out.eps.shape == (4, 5, 1, 8, 8)
    assert out.uncertainty.shape == (4, 4, 1, 8, 8)
    assert bool(((out.uncertainty > 0) & (out.uncertainty < 1)).all())
    confidence = out.confidence
    assert confidence.dtype == torch.float64
    assert torch.allclose(confidence, 1 - out.uncertainty.double().mean(dim=(2, 3, 4)))


def test_denoise_never_exit_equals_full(tiny_model):
    x = torch.randn(6, 1, 8, 8)
    eps, exits = tiny_model.denoise(x, 4, threshold=torch.full((6,), math.inf, dtype=torch.float64))
    assert torch.equal(eps, tiny_model.full(x, 4))
    assert exits.tolist() == [4] * 6


def test_denoise_threshold_zero_leaves_at_earliest_exit(tiny_model):
    x = torch.randn(5, 1, 8, 8)
    out = tiny_model(x, 2)
    for earliest in (0, 1, 3):
        eps, exits = tiny_model.denoise(
            x, 2, threshold=torch.zeros(5, dtype=torch.float64), earliest_exit=earliest
        )
        assert exits.tolist() == [earliest] * 5
        torch.testing.assert_close(eps, out.eps[:, earliest], rtol=0, atol=1e-5)


def test_exit_flops_accounting(tiny_model):
    flops = exit_flops(tiny_model, earliest_exit=1)
    blocks, heads, uems = flops["block"], flops["head"], flops["uem"]
    assert len(blocks) == len(heads) == 5 and len(uems) == 4
    assert all(v > 0 for v in (*blocks, *heads, *uems))
    assert flops["full"] == flops["embed"] + sum(blocks) + heads[-1]
    # Leaving at exit 2: embedding, blocks 0..2, the UEMs of exits 1 and 2, head 2.
    assert flops["to_exit"][2] == flops["embed"] + sum(blocks[:3]) + uems[1] + uems[2] + heads[2]
    # The last exit pays every candidate UEM (1..3) on top of the full model.
    assert flops["to_exit"][-1] == flops["full"] + sum(uems[1:])
    assert flops["to_exit"] == sorted(flops["to_exit"])


def test_fingerprint_depends_on_architecture_not_weights(tiny_model):
    other = Denoiser(tiny_model.config)
    assert other.fingerprint == tiny_model.fingerprint
    wider = Denoiser(DenoiserConfig(width=48, depth=5, n_heads=2, steps=12, reference_steps=120))
    assert wider.fingerprint != tiny_model.fingerprint


def test_bad_inputs_name_the_argument(tiny_model):
    with pytest.raises(ValueError, match=r"`x` must have shape \(B, 1, 8, 8\) with B >= 1; got"):
        tiny_model(torch.zeros(2, 1, 9, 9), 0)
    with pytest.raises(TypeError, match=r"`x` must be a torch\.Tensor; got ndarray"):
        tiny_model(torch.zeros(2, 1, 8, 8).numpy(), 0)
    with pytest.raises(ValueError, match=r"`t` must lie in \[0, 11\]; got values in \[12, 12\]"):
        tiny_model(torch.zeros(2, 1, 8, 8), 12)
    with pytest.raises(
        ValueError,
        match=r"`earliest_exit` must be an integer in \[0, 4\] \(the model has 5 exits\); got 5",
    ):
        tiny_model.check_earliest_exit(5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"depth": 4}, "`depth` must be an odd integer >= 3; got 4."),
        ({"patch_size": 3}, "`patch_size` must divide `image_size` (8); got 3."),
        ({"width": 30, "n_heads": 2}, "`width` must be a multiple of `n_heads` (2) and of 4"),
        ({"steps": 0}, "`steps` must be a positive integer; got 0."),
        ({"steps": 10}, "`beta_end * reference_steps / steps` (the last beta after scaling"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        DenoiserConfig(**kwargs)


def test_a_28_by_28_model_runs():
    """The Fashion-MNIST layout (patch 4, 49 tokens) with random weights."""
    from exitguard.tasks.diffusion.demo import model_settings

    config, _ = model_settings("fashion-mnist", quick=True, seed=0)
    assert (config.image_size, config.patch_size, config.n_patches) == (28, 4, 49)
    torch.manual_seed(0)
    model = Denoiser(config).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        out = model(x, 10)
        eps, exits = model.denoise(x, 10, threshold=torch.zeros(3, dtype=torch.float64))
    assert out.eps.shape == (3, 7, 1, 28, 28) and out.uncertainty.shape == (3, 6, 1, 28, 28)
    assert exits.tolist() == [1, 1, 1]
    torch.testing.assert_close(eps, out.eps[:, 1], rtol=0, atol=1e-5)
