"""exitguard: early-exit neural networks that are fast yet safe.

Calibrate exit thresholds with distribution-free risk control (Jazbec, Timans et al.,
"Fast yet Safe: Early-Exiting with Risk Control", NeurIPS 2024) and run the network with real
compute savings. The PyTorch layer lives in :mod:`exitguard.nn` (``pip install
"exitguard[torch]"``); everything imported here needs only numpy and scipy.
"""

from exitguard.calibration import (
    NonMonotoneRiskWarning,
    RiskNotControlledWarning,
    build_table,
    calibrate,
    calibrate_table,
)
from exitguard.evaluation import Evaluation, EvaluationRow, evaluate
from exitguard.policy import ExitPolicy, PolicyFileError, load_policy
from exitguard.risk.losses import Risk

__version__ = "0.1.0"

__all__ = [
    "Evaluation",
    "EvaluationRow",
    "ExitPolicy",
    "NonMonotoneRiskWarning",
    "PolicyFileError",
    "Risk",
    "RiskNotControlledWarning",
    "__version__",
    "build_table",
    "calibrate",
    "calibrate_table",
    "evaluate",
    "load_policy",
]
