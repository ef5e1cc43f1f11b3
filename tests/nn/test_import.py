"""exitguard.nn is optional: a clear hint without torch, and the risk core never needs it."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("torch")


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)


BLOCK_TORCH = """
import importlib.abc, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, NoTorch())
"""


def test_importing_without_torch_says_how_to_install_it():
    result = run(
        BLOCK_TORCH + "try:\n    import exitguard.nn\n"
        "except ImportError as error:\n    print(error)\n"
    )
    assert 'pip install "exitguard[torch]"' in result.stdout, result.stderr


def test_the_risk_core_does_not_import_torch():
    result = run(
        BLOCK_TORCH + "import exitguard, exitguard.risk.exits, exitguard.risk.confidence\n"
        "print('torch' in sys.modules)\n"
    )
    assert result.stdout.strip() == "False", result.stderr
