"""One conformance harness over every builder of early-exit networks (timm's
``test_model_forward_intermediates`` in spirit).

For each builder — the classification CNN, the segmenter, ``attach_exits`` on a CNN and on a
transformer, the multi-exit BERT of the text task — with spread-out random exit heads:

* real exits (``infer``, with batch compaction) equal simulated exits (``simulate``) and the
  risk core's exit rule on the collected confidences, at thresholds that use every exit;
* never exiting (``math.inf``) equals the backbone's own output (the last exit);
* the FLOPs of a real run of one sample that leaves at exit ``e``, measured with torch's
  FLOP counter, equal ``count_flops(...).to_exit[e]``; never exiting costs ``.full``.

The diffusion denoiser and the LM decoder exit per step and per token with their own loops;
they apply the same rule (``risk.exits.first_exit``) and are held to the same three checks in
tests/diffusion/test_sample.py (sample = simulate, never exit = the full model) and
tests/language/test_decode.py (never exit = ``model.generate``, grid = separate calls).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from exitguard.nn import count_flops  # noqa: E402
from exitguard.nn.flops import flop_counter  # noqa: E402
from exitguard.risk.exits import exit_index  # noqa: E402
from tests.conftest import torch_threads  # noqa: E402
from tests.nn.conftest import TinyResNet, TinyViT, _midpoint_thresholds, spread_heads  # noqa: E402


def classifier():
    from exitguard.tasks.classification import CNNConfig, build_classifier

    torch.manual_seed(0)
    network = build_classifier(
        CNNConfig(widths=(8, 12, 16), strides=(1, 2, 1), drop_rate=0.0), image_shape=(1, 8, 8)
    )
    x = torch.rand(48, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    return spread_heads(network).eval(), x


def segmenter():
    from exitguard.tasks.segmentation import SegmenterConfig, build_segmenter

    torch.manual_seed(0)
    config = SegmenterConfig(widths=(8, 12, 12), strides=(2, 1, 1), dilations=(1, 1, 2))
    network = build_segmenter(config, image_shape=(1, 16, 16), num_classes=4)
    with torch.no_grad():  # spread the dense heads' classifiers; exit 1 bolder than exit 0
        generator = torch.Generator().manual_seed(3)
        for scale, head in zip((0.6, 2.0), network.heads[:-1], strict=True):
            for parameter in head.parameters():
                if parameter.ndim > 1:
                    parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))
    x = torch.rand(24, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    return network.eval(), x


def attached_cnn():
    from exitguard.nn import attach_exits

    torch.manual_seed(0)
    backbone = TinyResNet().eval()
    network = attach_exits(backbone, at=["layer1", "layer2"], input_shape=(3, 16, 16))
    x = torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return spread_heads(network).eval(), x


def attached_transformer():
    from exitguard.nn import attach_exits

    torch.manual_seed(0)
    network = attach_exits(
        TinyViT().eval(),
        at=["blocks.0", "blocks.1", "blocks.2"],
        input_shape=(3, 16, 16),
        head_options={"pool": "cls"},
    )
    x = torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return spread_heads(network).eval(), x


def text_bert():
    pytest.importorskip("transformers")
    from tests.text.conftest import make_network, make_tiny_bert, make_tokens, mixed_lengths

    network = make_network(make_tiny_bert())
    return network, make_tokens(mixed_lengths(40), total=24)


BUILDERS = {
    "classifier": classifier,
    "segmenter": segmenter,
    "attach_exits on a CNN": attached_cnn,
    "attach_exits on a transformer": attached_transformer,
    "multi-exit BERT": text_bert,
}


@pytest.fixture(params=list(BUILDERS), scope="module")
def built(request):
    with torch_threads(1):
        yield BUILDERS[request.param]()


def _exits(result):
    return result.exits.cpu().numpy()


def test_real_exits_equal_simulated_exits_and_the_core_rule(built):
    network, x = built
    with torch.inference_mode():
        _, confidences = network.exit_confidences(x)
    conf = confidences.double().numpy()  # (B, L)
    thresholds = _midpoint_thresholds(conf)
    assert thresholds, "the heads give no spread of confidences"
    used = set()
    for threshold in thresholds:
        real = _exits(network.infer(x, threshold))
        np.testing.assert_array_equal(real, _exits(network.simulate(x, threshold)))
        np.testing.assert_array_equal(real, exit_index(conf, threshold))
        used.update(real.tolist())
    assert used == set(range(network.n_exits)), f"exits used: {sorted(used)}"


def test_never_exiting_is_the_backbone(built):
    network, x = built
    result = network.infer(x, math.inf)
    assert (_exits(result) == network.n_exits - 1).all()
    with torch.inference_mode():
        backbone = network(x)[:, -1]  # (B, C, ...) the last exit: the model's own output
    torch.testing.assert_close(result.logits, backbone, rtol=1e-5, atol=1e-5)


def _leaving_threshold(conf: np.ndarray, exit_: int) -> float | None:
    """A threshold at which a sample with confidences ``conf`` (L,) leaves at ``exit_``."""
    if exit_ == len(conf) - 1:
        top = conf[:-1].max()
        return None if top >= 1.0 - 1e-6 else float(top) + 1e-6
    # Just below this exit's confidence (a tie would be at the mercy of the last bit).
    threshold = float(conf[exit_]) - 1e-6
    return None if (conf[:exit_] >= threshold).any() else threshold


def test_flops_of_real_runs_equal_the_counted_table(built):
    network, x = built
    with torch.inference_mode():
        _, confidences = network.exit_confidences(x)
    conf = confidences.double().numpy()  # (B, L)
    checked = set()
    for exit_ in range(network.n_exits):
        # The first sample that can leave at this exit, run alone (its FLOPs are per sample).
        for index in range(len(x)):
            threshold = _leaving_threshold(conf[index], exit_)
            if threshold is not None:
                break
        else:
            continue
        sample = x[index : index + 1]
        table = count_flops(network, sample)
        with flop_counter() as counter:
            result = network.infer(sample, threshold)
        assert int(result.exits[0]) == exit_
        assert counter.get_total_flops() == table.to_exit[exit_], f"exit {exit_}"
        checked.add(exit_)
        with flop_counter() as counter:
            network.infer(sample, math.inf)
        assert counter.get_total_flops() == table.full
    assert checked == set(range(network.n_exits)), f"exits checked: {sorted(checked)}"
