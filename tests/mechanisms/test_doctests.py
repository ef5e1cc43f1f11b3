"""The examples in the mechanisms' docstrings run."""

import doctest
import importlib

import pytest

MODULES = [
    "exitguard.nn.anytime",
    "exitguard.nn.cascade",
    "exitguard.nn.halting",
    "exitguard.nn.skipping",
    "exitguard.tasks.mechanisms.tables",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    pytest.importorskip("torch")
    module = importlib.import_module(name)
    failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert tried > 0
    assert failures == 0
