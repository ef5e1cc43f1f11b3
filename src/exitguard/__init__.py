"""exitguard: early-exit neural networks that are fast yet safe."""

from exitguard.policy import ExitPolicy, PolicyFileError, load_policy

__version__ = "0.1.0"

__all__ = ["ExitPolicy", "PolicyFileError", "__version__", "load_policy"]
