"""The examples in the public docstrings run."""

import doctest
import importlib

import pytest

MODULES = [
    "exitguard.calibration",
    "exitguard.distributed.merge",
    "exitguard.pareto_calibration",
    "exitguard.policy",
    "exitguard.risk.configurations",
    "exitguard.risk.exits",
    "exitguard.risk.pareto",
    "exitguard.risk.quantile",
    "exitguard.risk.tail",
    "exitguard.tasks.language.rouge",
]
TORCH_MODULES = [
    "exitguard.nn.attach",
    "exitguard.nn.confidence",
    "exitguard.nn.flops",
    "exitguard.nn.network",
    "exitguard.tasks.diffusion.model",
    "exitguard.tasks.diffusion.sweep",
]
LM_MODULES = [
    "exitguard.tasks.language.heads",
    "exitguard.tasks.language.decode",
    "exitguard.tasks.language.sweep",
    "exitguard.tasks.text.model",
]


@pytest.mark.parametrize("name", MODULES + TORCH_MODULES + LM_MODULES)
def test_docstring_examples(name):
    if name in TORCH_MODULES or name in LM_MODULES:
        pytest.importorskip("torch")
    if name in LM_MODULES:
        pytest.importorskip("transformers")
    module = importlib.import_module(name)
    failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert tried > 0
    assert failures == 0
