"""Bad configurations of the mechanisms are refused with messages that name the argument."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from exitguard.nn import (  # noqa: E402
    AnytimeNetwork,
    Cascade,
    HaltingNetwork,
    HaltingTrainConfig,
    SkipGate,
    SkipNetwork,
    SkipTrainConfig,
    train_halting,
)
from exitguard.tasks.mechanisms.collect import skipping_table  # noqa: E402
from tests.mechanisms.conftest import (  # noqa: E402
    cascade,
    classifier,
    halting,
    images,
    skip_network,
)


def test_cascade_configurations():
    linear = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"`models` must hold at least 2 modules .* got 1"):
        Cascade([linear])
    with pytest.raises(TypeError, match=r"`models\[1\]` must be an nn.Module; got str"):
        Cascade([linear, "big"])
    with pytest.raises(ValueError, match="`confidence` must be a pointwise measure"):
        Cascade([linear, linear], confidence="patience")
    model = cascade()
    x = images(4)
    for bad in (1.5, -0.1, math.nan):
        with pytest.raises(ValueError, match=r"`threshold` must be a float in \[0, 1\] or inf"):
            model.infer(x, bad)
    with pytest.raises(ValueError, match=r"`x` must have shape \(B, 1, 8, 8\)"):
        model.infer(torch.zeros(2, 1, 4, 4), 0.5)
    wrong = Cascade([nn.Identity(), nn.Sequential(nn.Flatten(), nn.Linear(4, 3))])
    with pytest.raises(ValueError, match=r"model 0 must return logits \(B, C\) for B = 2"):
        wrong(torch.zeros(2, 1, 2, 2))
    mismatched = Cascade([nn.Flatten(), nn.Sequential(nn.Flatten(), nn.Linear(4, 3))])
    with pytest.raises(ValueError, match=r"every model must give logits of the same shape"):
        mismatched(torch.zeros(2, 1, 2, 2))


def test_halting_configurations():
    network = classifier()
    units = list(halting().units)
    with pytest.raises(ValueError, match=r"`units` must hold one halting unit per exit but the"):
        HaltingNetwork(network, units[:1])
    with pytest.raises(TypeError, match=r"`units\[0\]` must be a HaltingUnit; got Linear"):
        HaltingNetwork(network, [nn.Linear(2, 2), units[1]])
    with pytest.raises(ValueError, match=r"`prior` must be a number in \(0, 1\); got 1.0"):
        HaltingTrainConfig(prior=1.0)
    with pytest.raises(ValueError, match="`target` must be 'labels' or 'full'"):
        HaltingTrainConfig(target="teacher")  # type: ignore[arg-type]
    model = halting()
    x = images(8)
    with pytest.raises(ValueError, match="`labels` are required for target='labels'"):
        train_halting(model, x, None, config=HaltingTrainConfig(epochs=1))
    with pytest.raises(ValueError, match="`exit_cost` must hold 3 finite costs"):
        train_halting(model, x, np.zeros(8, int), exit_cost=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"`threshold` must be a float in \[0, 1\] or inf"):
        model.infer(x, 2.0)


def test_anytime_budgets():
    network = classifier()
    x = images(6)
    model = AnytimeNetwork(network, x)
    first = model.budget_cost()[0]
    with pytest.raises(ValueError, match=r"`budget` must allow at least the first exit"):
        model.infer(x, budget=first - 1)
    with pytest.raises(TypeError, match="`budget` must be a number or a tensor"):
        model.infer(x, budget=True)
    with pytest.raises(ValueError, match="`budget` must be finite"):
        model.infer(x, budget=math.inf)
    with pytest.raises(ValueError, match=r"`budget` must be one number or one per sample \(6,\)"):
        model.infer(x, budget=torch.full((5,), float(first)))
    with pytest.raises(ValueError, match="a budget in 'ms' needs a latency profile"):
        model.infer(x, budget=1.0, unit="ms")
    with pytest.raises(ValueError, match="`unit` must be one of 'flops', 'ms', 'batch_ms'"):
        model.budget_cost("seconds")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`network` must be an EarlyExitNetwork"):
        AnytimeNetwork(nn.Linear(2, 2), x)  # type: ignore[arg-type]


def test_skipping_configurations():
    block = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"`gates` must hold one entry .* per block \(2\); got 1"):
        SkipNetwork(nn.Identity(), [block, block], [SkipGate(4)], nn.Identity())
    with pytest.raises(ValueError, match="`gates` must hold at least one SkipGate"):
        SkipNetwork(nn.Identity(), [block], [None], nn.Identity())
    with pytest.raises(TypeError, match=r"`gates\[0\]` must be a SkipGate or None; got Linear"):
        SkipNetwork(nn.Identity(), [block], [nn.Linear(4, 1)], nn.Identity())  # type: ignore[list-item]
    reshaping = SkipNetwork(nn.Identity(), [nn.Linear(4, 3)], [SkipGate(4)], nn.Identity())
    with pytest.raises(ValueError, match="gated block 0 must keep the shape of its input"):
        reshaping.infer(torch.zeros(2, 4), 0.0)
    model = skip_network()
    x = images(4)
    for bad in (math.inf, 1.5, -0.5):
        with pytest.raises(ValueError, match=r"`threshold` must be a number in \[0, 1\]"):
            model.infer(x, bad)
    with pytest.raises(TypeError, match=r"`threshold` must be a number in \[0, 1\]"):
        model.infer(x, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`warmup_epochs` must be an integer in \[0, epochs"):
        SkipTrainConfig(epochs=3, warmup_epochs=3)
    with pytest.raises(ValueError, match="`temperature` must be a finite number > 0"):
        SkipTrainConfig(temperature=0.0)
    flops = model.count_flops(x)
    with pytest.raises(ValueError, match="`thresholds` must be increasing skip thresholds"):
        skipping_table(model, x, np.zeros(4, int), thresholds=[0.2, 0.5], flops=flops)
    with pytest.raises(ValueError, match="`ran` must have 4 entries"):
        flops.cost(np.ones((2, 3)))
