"""attach_exits: cutting CNNs and transformer encoders, inferring heads, clear errors."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from exitguard.nn import ClassifierHead, DenseHead, attach_exits  # noqa: E402


def test_cnn_cut_gives_stages_heads_and_the_backbone_output(resnet, images):
    network = attach_exits(resnet, at=["layer1", "layer2"], input_shape=(3, 16, 16))
    assert network.n_exits == 3 and network.input_shape == (3, 16, 16)
    heads = network.heads
    assert isinstance(heads[0], ClassifierHead) and heads[0].in_features == 8
    assert heads[1].in_features == 16 and heads[0].input_format == "NCHW"
    assert isinstance(heads[2], nn.Identity)  # the backbone's own head is the last exit
    x = images(4)
    with torch.no_grad():
        torch.testing.assert_close(network.eval()(x)[:, -1], resnet(x), rtol=0, atol=0)


def test_transformer_cut_reads_tokens(vit, images):
    network = attach_exits(
        vit, at=["blocks.1", "blocks.3"], input_shape=(3, 16, 16), head_options={"pool": "cls"}
    )
    assert network.heads[0].input_format == "NLC" and network.heads[0].pool == "cls"
    with torch.no_grad():
        out = network.eval()(images(3))
    assert out.shape == (3, 3, 5)


def test_nn_transformer_encoder_inside_a_model_can_be_cut():
    class TextClassifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
            self.head = nn.Linear(16, 4)

        def forward(self, ids):
            return self.head(self.encoder(self.embed(ids)).mean(dim=1))

    model = TextClassifier().eval()
    ids = torch.randint(0, 50, (5, 9), generator=torch.Generator().manual_seed(0))
    network = attach_exits(model, at=["encoder.layers.0", "encoder.layers.1"], example_input=ids)
    assert network.input_shape == (9,)
    with torch.inference_mode():
        expected = model(ids)
    torch.testing.assert_close(network.infer(ids, float("inf")).logits, expected)


def test_the_network_shares_the_backbone_parameters(resnet):
    network = attach_exits(resnet, at=["layer1"], input_shape=(3, 16, 16))
    backbone = {id(p) for p in resnet.parameters()}
    assert backbone <= {id(p) for p in network.parameters()}


def test_dense_heads_match_the_backbone_resolution():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
        nn.Upsample(scale_factor=2),
    )
    network = attach_exits(model, at=["1", "3"], input_shape=(3, 8, 8), head="dense")
    assert isinstance(network.heads[1], DenseHead) and network.heads[1].out_size == (8, 8)
    with torch.no_grad():
        assert network(torch.randn(2, 3, 8, 8)).shape == (2, 3, 4, 8, 8)


def test_a_head_factory_gets_the_feature_shape(resnet):
    seen = []

    def factory(shape, num_classes):
        seen.append(shape)
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    attach_exits(resnet, at=["layer1", "layer2"], input_shape=(3, 16, 16), head=factory)
    assert seen == [(8, 16, 16), (16, 8, 8)]


def test_the_dry_run_leaves_batchnorm_statistics_alone(resnet):
    resnet.train()
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    network = attach_exits(resnet, at=["layer1"], input_shape=(3, 16, 16))
    assert all(torch.equal(before[k], v) for k, v in resnet.state_dict().items())
    assert resnet.training and network.training


@pytest.mark.parametrize(
    ("at", "message"),
    [
        (["layer4"], r"'layer4' is not a module of TinyResNet\. Did you mean 'layer3', 'layer2'"),
        (["layer2", "layer1"], r"execution order; got \['layer2', 'layer1'\], but the forward"),
        (["layer1", "layer1"], r"`at` must not repeat a module name"),
        (["layer1", "layer1.conv1"], r"'layer1.conv1' lies inside 'layer1'"),
        (["fc"], r"nothing runs after 'fc'; the backbone's own output already is the last exit"),
        (
            ["layer1.conv2"],
            (
                r"TinyResNet cannot be cut at 'layer1.conv2': the value 'relu' \(from relu\) "
                r"is computed before that cut and used after it"
            ),
        ),
    ],
)
def test_bad_cuts_are_explained(resnet, at, message):
    with pytest.raises(ValueError, match=message):
        attach_exits(resnet, at=at, input_shape=(3, 16, 16))


class TwoLinear(nn.Module):
    """``a`` (4 -> 4) then ``b`` (4 -> ``classes``); each subclass writes the forward it tests."""

    def __init__(self, classes: int = 2):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, classes)

    def forward(self, x):
        return self.b(self.a(x))


def test_untraceable_models_are_explained():
    class Branchy(TwoLinear):
        def forward(self, x):
            return self.b(self.a(x)) if x.sum() > 0 else self.b(x)

    with pytest.raises(ValueError, match=r"Branchy cannot be cut: torch.fx could not trace"):
        attach_exits(Branchy(), at=["a"], input_shape=(4,))


def test_modules_called_twice_or_never_are_explained():
    class Shared(TwoLinear):
        def __init__(self):
            super().__init__()
            self.unused = nn.Linear(4, 4)

        def forward(self, x):
            return self.b(self.a(self.a(x)))

    with pytest.raises(ValueError, match=r"module 'a' is called 2 times by the forward"):
        attach_exits(Shared(), at=["a"], input_shape=(4,))
    with pytest.raises(ValueError, match=r"module 'unused' is never called"):
        attach_exits(Shared(), at=["unused"], input_shape=(4,))


def test_input_skip_and_tuple_outputs_are_explained():
    class InputSkip(TwoLinear):
        def forward(self, x):
            return self.a(x) + x

    with pytest.raises(ValueError, match=r"cannot be cut at 'a': the model's input is computed"):
        attach_exits(InputSkip(), at=["a"], input_shape=(4,))

    class Pair(TwoLinear):
        def forward(self, x):
            return self.a(x), x

    with pytest.raises(ValueError, match=r"must return one tensor \(or a mapping with a `logits`"):
        attach_exits(Pair(), at=["a"], input_shape=(4,))


def test_argument_errors(resnet):
    with pytest.raises(TypeError, match=r"`at` must be a non-empty list .*Write at=\['layer1'\]"):
        attach_exits(resnet, at="layer1", input_shape=(3, 16, 16))
    with pytest.raises(ValueError, match=r"give exactly one of `input_shape`"):
        attach_exits(resnet, at=["layer1"])
    with pytest.raises(ValueError, match=r"`num_classes` is 7, but the model's output has 5"):
        attach_exits(resnet, at=["layer1"], input_shape=(3, 16, 16), num_classes=7)
    with pytest.raises(TypeError, match=r"`model` must be an nn.Module; got str"):
        attach_exits("resnet", at=["layer1"], input_shape=(3, 16, 16))
    with pytest.raises(ValueError, match=r"`head` must be 'classifier', 'dense' or a callable"):
        attach_exits(resnet, at=["layer1"], input_shape=(3, 16, 16), head="mlp")
    with pytest.raises(ValueError, match=r"`head='dense'` needs feature maps"):
        attach_exits(resnet, at=["layer1"], input_shape=(3, 16, 16), head="dense")


def test_tensor_constants_in_forward_survive_the_cut():
    class WithConstant(TwoLinear):
        def __init__(self):
            super().__init__()
            self.scale = torch.tensor([1.0, 2.0, 3.0, 4.0])  # a plain attribute, not a buffer

        def forward(self, x):
            return self.b(self.a(x) * self.scale)

    model = WithConstant()
    network = attach_exits(model, at=["a"], input_shape=(4,))
    x = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(network(x)[:, -1], model(x))


def test_a_mapping_output_gives_its_logits():
    """Hugging Face models return a ModelOutput (a mapping); its `logits` is the last exit."""

    class Dict(TwoLinear):
        def forward(self, x):
            hidden = self.a(x)
            return {"hidden": hidden, "logits": self.b(torch.relu(hidden))}

    model = Dict(classes=3)
    network = attach_exits(model, at=["a"], input_shape=(4,))
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(network(x)[:, -1], model(x)["logits"])

    class NoLogits(Dict):
        def forward(self, x):
            return {"out": self.b(self.a(x))}

    with pytest.raises(ValueError, match=r"one tensor \(or a mapping with a `logits` tensor\)"):
        attach_exits(NoLogits(), at=["a"], input_shape=(4,))


class _TupleLayer(nn.Module):
    """A layer that returns (hidden, extra), as transformers 4.x layers do."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return torch.tanh(self.linear(x)), x.sum()


def test_a_layer_returning_a_tuple_is_cut_after_its_first_element():
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([_TupleLayer() for _ in range(3)])
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)[0]
            return self.head(x)

    model = Stack()
    network = attach_exits(model, at=["layers.0", "layers.1"], input_shape=(4,))
    x = torch.randn(6, 4)
    with torch.no_grad():
        torch.testing.assert_close(network(x)[:, -1], model(x))
        torch.testing.assert_close(network.forward_intermediates(x)[0], model.layers[0](x)[0])
    assert network.infer(x, 0.0).exits.tolist() == [0] * 6

    class UsesBoth(Stack):
        def forward(self, x):
            hidden, extra = self.layers[0](x)
            return self.head(self.layers[1](hidden)[0] + extra)

    with pytest.raises(ValueError, match=r"module 'layers.0' returns tuple; an exit can only"):
        attach_exits(UsesBoth(), at=["layers.0"], input_shape=(4,))


def test_a_forward_may_branch_on_the_input_and_weight_dtypes():
    """As Hugging Face ViT does: `if pixel_values.dtype != weight.dtype: convert`."""

    class Checks(TwoLinear):
        def forward(self, x):
            if x.dtype != self.a.weight.dtype:
                x = x.to(self.a.weight.dtype)
            if x.ndim != 2:
                raise ValueError("needs (B, 4)")
            return self.b(self.a(x))

    model = Checks(classes=3)
    network = attach_exits(model, at=["a"], input_shape=(4,))
    x = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(network(x)[:, -1], model(x))
