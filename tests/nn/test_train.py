"""train_exits: frozen backbone, joint training, loss weights, distillation, reproducibility."""

from __future__ import annotations

import copy
import math

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from exitguard.nn import TrainConfig, exit_losses, train_exits  # noqa: E402


@pytest.fixture
def data(images):
    x = images(48, seed=21)
    labels = x.mean(dim=(2, 3)).argmax(dim=1) + 2 * (x[:, 0, :8].mean(dim=(1, 2)) > 0)
    return x, labels  # a learnable rule over 5 classes


def backbone_state(network):
    return {k: v.clone() for k, v in network.stages.state_dict().items()}


def test_heads_only_leaves_the_backbone_and_its_batchnorm_statistics_unchanged(cnn_network, data):
    x, y = data
    cnn_network.train()  # even a network left in train mode
    before = backbone_state(cnn_network)
    heads_before = copy.deepcopy(cnn_network.heads.state_dict())
    history = train_exits(
        cnn_network, x, labels=y, config=TrainConfig(epochs=2, batch_size=16), progress=False
    )
    after = cnn_network.stages.state_dict()
    assert any("running_mean" in k for k in after)
    assert any("num_batches_tracked" in k for k in after)
    for name, value in after.items():
        assert torch.equal(value, before[name]), name
    assert not torch.equal(cnn_network.heads[0].fc.weight, heads_before["0.fc.weight"])
    assert cnn_network.training and cnn_network.stages[0].training  # modes restored
    assert history.loss.shape == (2,) and history.exit_accuracy.shape == (2, 3)


def test_joint_training_moves_the_backbone(cnn_network, data):
    x, y = data
    before = backbone_state(cnn_network)
    config = TrainConfig(mode="joint", epochs=1, batch_size=16, distill=0.5, temperature=2.0)
    train_exits(cnn_network, x, labels=y, config=config, progress=False)
    after = cnn_network.stages.state_dict()
    changed = [k for k, v in after.items() if not torch.equal(v, before[k])]
    assert any(k.endswith("conv1.weight") for k in changed)
    assert any(k.endswith("running_mean") for k in changed)


def test_training_is_seeded_and_leaves_the_global_random_state_alone(cnn_network, data):
    x, y = data
    twin = copy.deepcopy(cnn_network)
    for module in (cnn_network, twin):
        module.heads[0].drop.p = 0.3  # dropout draws from the seeded generator
    config = TrainConfig(mode="joint", epochs=1, batch_size=16, seed=5)
    state = torch.get_rng_state()
    first = train_exits(cnn_network, x, labels=y, config=config, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    second = train_exits(twin, x, labels=y, config=config, progress=False)
    assert first.loss.tolist() == second.loss.tolist()
    for (name, a), b in zip(
        cnn_network.state_dict().items(), twin.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    other = copy.deepcopy(twin)
    train_exits(other, x, labels=y, config=TrainConfig(seed=6), progress=False)
    assert not torch.equal(other.heads[0].fc.weight, twin.heads[0].fc.weight)


def test_loss_weights_are_applied(cnn_network, data):
    x, y = data
    before = copy.deepcopy(cnn_network.heads.state_dict())
    config = TrainConfig(loss_weights=(0.0, 1.0, 1.0), batch_size=16)
    train_exits(cnn_network, x, labels=y, config=config, progress=False)
    after = cnn_network.heads.state_dict()
    assert torch.equal(after["0.fc.weight"], before["0.fc.weight"])  # weight 0: untouched
    assert not torch.equal(after["1.fc.weight"], before["1.fc.weight"])


def test_heads_learn_with_a_data_loader(cnn_network, data):
    x, y = data
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=12)
    config = TrainConfig(epochs=8, lr=2e-2)
    history = train_exits(cnn_network, loader, config=config, progress=False)
    assert history.exit_loss[-1, 0] < history.exit_loss[0, 0]
    assert "TrainHistory(mode='heads', epochs=8" in repr(history)


def test_exit_losses_by_hand():
    logits = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3])
    weights = torch.tensor([1.0, 2.0, 1.0])
    loss, ce = exit_losses(logits, labels, weights=weights, distill=0.5, temperature=2.0)
    expected_ce = torch.stack([F.cross_entropy(logits[:, e], labels) for e in range(3)])
    teacher = F.softmax(logits[:, 2] / 2, dim=1)
    kd = [
        4 * (teacher * (teacher.log() - F.log_softmax(logits[:, e] / 2, dim=1))).sum(1).mean()
        for e in range(2)
    ]
    per_exit = expected_ce + 0.5 * torch.stack([*kd, torch.tensor(0.0)])
    torch.testing.assert_close(ce, expected_ce)
    torch.testing.assert_close(loss, (weights * per_exit).sum() / 4)


def test_dense_labels_with_ignored_pixels():
    logits = torch.randn(2, 2, 3, 4, 4)
    labels = torch.randint(0, 3, (2, 4, 4))
    labels[0, 0] = -100
    loss, ce = exit_losses(logits, labels, weights=torch.ones(2))
    assert torch.isfinite(loss) and ce.shape == (2,)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_learning_rate_schedule_per_epoch(cnn_network, data, monkeypatch, schedule):
    x, y = data
    seen = []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    config = TrainConfig(epochs=4, batch_size=16, lr=0.02, lr_schedule=schedule)
    train_exits(cnn_network, x, labels=y, config=config, progress=False)
    # 48 samples in batches of 16: three steps per epoch, the rate fixed within an epoch.
    cosine = [0.01 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    expected = [0.02] * 4 if schedule == "constant" else cosine
    assert seen == pytest.approx([rate for rate in expected for _ in range(3)], rel=1e-12)
    with pytest.raises(ValueError, match="`lr_schedule` must be 'constant' or 'cosine'"):
        TrainConfig(lr_schedule="linear")


def test_training_errors(cnn_network, data):
    x, y = data
    with pytest.raises(ValueError, match=r"`loss_weights` must have one weight per exit \(3\)"):
        train_exits(cnn_network, x, labels=y, config=TrainConfig(loss_weights=(1, 1)))
    with pytest.raises(ValueError, match=r"training needs labels"):
        train_exits(cnn_network, x, progress=False)
    with pytest.raises(TypeError, match=r"one-shot iterator but `epochs` > 1"):
        train_exits(cnn_network, iter([(x, y)]), config=TrainConfig(epochs=2))
    with pytest.raises(ValueError, match=r"`labels` is only for a tensor `data`"):
        train_exits(cnn_network, [(x, y)], labels=y, progress=False)
    with pytest.raises(ValueError, match=r"`labels` must have one entry per sample \(48\)"):
        train_exits(cnn_network, x, labels=y[:3], progress=False)
    from exitguard.nn import EarlyExitNetwork

    frozen = EarlyExitNetwork([nn.Flatten(), nn.Linear(768, 5)], [nn.Identity()])
    with pytest.raises(ValueError, match=r"nothing to train in mode 'heads'"):
        train_exits(frozen, x, labels=y, progress=False)


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ({"mode": "all"}, r"`mode` must be 'heads' or 'joint'; got 'all'"),
        ({"epochs": 0}, r"`epochs` must be a positive integer; got 0"),
        ({"lr": 0.0}, r"`lr` must be > 0; got 0.0"),
        ({"distill": -1.0}, r"`distill` must be >= 0; got -1.0"),
        ({"loss_weights": (0.0, 0.0)}, r"`loss_weights` must hold one non-negative weight"),
    ],
)
def test_config_validation(field, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**field)


def test_numpy_arrays_train_as_their_tensors(cnn_network, data):
    """A numpy array of float64 images and integer labels trains exactly as the float32
    tensor; an array that holds no numbers says to pass a tensor."""
    x, y = data
    twin = copy.deepcopy(cnn_network)
    config = TrainConfig(mode="joint", epochs=1, batch_size=16, seed=3)
    from_tensor = train_exits(cnn_network, x, labels=y, config=config, progress=False)
    from_numpy = train_exits(
        twin, x.double().numpy(), labels=y.numpy(), config=config, progress=False
    )
    assert from_numpy.loss.tolist() == from_tensor.loss.tolist()
    for (name, a), b in zip(
        cnn_network.state_dict().items(), twin.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    with pytest.raises(TypeError, match=r"Pass a tensor of samples \(e.g. torch.from_numpy"):
        train_exits(twin, x.numpy().astype(object), labels=y, progress=False)


def test_the_progress_bar_shows_the_total_and_the_epoch_mean_loss(cnn_network, data, capsys):
    x, y = data
    history = train_exits(
        cnn_network, x, labels=y, config=TrainConfig(epochs=2, batch_size=16), progress=True
    )
    err = capsys.readouterr().err
    assert "epoch 1/2" in err and "epoch 2/2" in err
    assert "3/3" in err  # 48 samples in batches of 16: the total is known
    for loss in history.loss:  # the epoch's mean, not the last batch's
        assert f"mean_loss={loss:.4f}" in err
