"""attach_exits on the models users bring: timm and Hugging Face, randomly initialised.

Each model gets exits, its heads train for a step, and real skipping must equal the
simulated exits (with the last exit equal to the model's own output). timm is an optional
extra; the Hugging Face models come with the `lm` extra.
"""

from __future__ import annotations

import math
import re

import pytest

torch = pytest.importorskip("torch")

from exitguard.nn import TrainConfig, attach_exits, train_exits  # noqa: E402


def _import_timm():
    try:
        import timm
    except ImportError as error:  # timm, or the torchvision it imports, is missing
        pytest.skip(f"needs timm and a torchvision built for this torch ({error}); see the README")
    except RuntimeError as error:  # torchvision built for another torch (e.g. CUDA vs CPU)
        pytest.skip(f"timm cannot be imported: torchvision does not load against torch ({error})")
    return timm


def _check(network, model, x, labels):
    """Train the heads for a step, then compare real and simulated exits and the last exit."""
    history = train_exits(
        network, x, labels=labels, config=TrainConfig(mode="heads", batch_size=len(x)),
        progress=False,
    )  # fmt: skip
    assert history.loss.shape == (1,) and math.isfinite(history.loss[0])
    network.eval()
    with torch.inference_mode():
        expected = model(x)
        expected = getattr(expected, "logits", expected)
        conf = network.exit_confidences(x)[1][:, :-1]  # (B, L - 1)
    values = torch.unique(conf.flatten())
    middle = float(values[len(values) // 2 - 1 : len(values) // 2 + 1].mean())
    for threshold in (0.0, middle, math.inf):
        for batch in (1, len(x)):
            real = network.infer(x[:batch], threshold)
            simulated = network.simulate(x[:batch], threshold)
            assert real.exits.tolist() == simulated.exits.tolist()
            torch.testing.assert_close(real.logits, simulated.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(network.infer(x, math.inf).logits, expected, rtol=1e-4, atol=1e-5)


TINY_ENCODER = {
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "num_labels": 3,
}
"""A 4-layer, 32-wide encoder with 3 classes: the size of both Hugging Face models here."""


def _layer_names(model, pattern):
    return [name for name, _ in model.named_modules() if re.fullmatch(pattern, name)]


@pytest.mark.parametrize(
    ("name", "at", "size"),
    [
        ("resnet18", ["layer1", "layer2", "layer3"], 64),
        ("convnext_atto", ["stages.0", "stages.1", "stages.2"], 64),
        ("vit_tiny_patch16_224", ["blocks.3", "blocks.7"], 224),
    ],
)
def test_timm_models(name, at, size):
    timm = _import_timm()
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=4).eval()
    x = torch.randn(3, 3, size, size)
    network = attach_exits(model, at=at, input_shape=(3, size, size))
    assert network.n_exits == len(at) + 1
    _check(network, model, x, torch.tensor([0, 1, 2]))


def test_hugging_face_bert_for_sequence_classification():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, **TINY_ENCODER)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(1, 50, (5, 9), generator=torch.Generator().manual_seed(0))
    # transformers 4.x names the layers bert.encoder.layer.N; the names are the model's own.
    at = _layer_names(model, r"bert\.encoder\.layers?\.[02]")
    network = attach_exits(model, at=at, example_input=ids)  # returns a ModelOutput: its logits
    assert network.n_exits == 3 and network.heads[0].input_format == "NLC"
    _check(network, model, ids, torch.tensor([0, 1, 2, 0, 1]))


def test_hugging_face_vit_for_image_classification():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=32, patch_size=8, **TINY_ENCODER)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    # ViT's forward checks the input's dtype against its weights' (known while tracing).
    at = _layer_names(model, r"vit\.(encoder\.layer|layers)\.[12]")
    assert len(at) == 2, at
    network = attach_exits(model, at=at, input_shape=(3, 32, 32), head_options={"pool": "cls"})
    _check(network, model, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))
