"""The examples in the public docstrings run."""

import doctest
import importlib

import pytest

MODULES = ["exitguard.calibration", "exitguard.risk.exits"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert tried > 0
    assert failures == 0
