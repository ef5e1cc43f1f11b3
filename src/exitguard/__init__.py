"""exitguard: early-exit neural networks that are fast yet safe.

Calibrate exit thresholds with distribution-free risk control (Jazbec, Timans et al.,
"Fast yet Safe: Early-Exiting with Risk Control", NeurIPS 2024) and run the network with real
compute savings. The PyTorch layer lives in :mod:`exitguard.nn` (``pip install
"exitguard[torch]"``); everything imported here needs only numpy and scipy.
"""

from exitguard.calibration import (
    CertifiedAboveTargetWarning,
    MonotonicityCheck,
    NonMonotoneRiskWarning,
    RiskNotControlledWarning,
    build_table,
    build_table_from_predictions,
    calibrate,
    calibrate_predictions,
    calibrate_table,
    monotonicity_check,
)
from exitguard.evaluation import Evaluation, EvaluationRow, evaluate
from exitguard.pareto_calibration import RiskTarget, calibrate_pareto
from exitguard.policy import AppliedPolicy, ExitPolicy, PolicyFileError, RiskPromise, load_policy
from exitguard.risk.configurations import (
    ConfigurationTable,
    ThresholdFamily,
    evaluate_vectors,
    family_table,
)
from exitguard.risk.losses import Risk
from exitguard.risk.pareto import (
    NothingCertifiedWarning,
    ParetoSelection,
    VectorSearch,
    pareto_test,
    pareto_test_table,
)
from exitguard.risk.procedures import Procedure, get_procedure
from exitguard.risk.quantile import CVaRSelection, certify_cvar
from exitguard.risk.tail import exceedance_losses, exceedance_per_exit

__version__ = "0.1.0"

__all__ = [
    "AppliedPolicy",
    "CVaRSelection",
    "CertifiedAboveTargetWarning",
    "ConfigurationTable",
    "Evaluation",
    "EvaluationRow",
    "ExitPolicy",
    "MonotonicityCheck",
    "NonMonotoneRiskWarning",
    "NothingCertifiedWarning",
    "ParetoSelection",
    "PolicyFileError",
    "Procedure",
    "Risk",
    "RiskNotControlledWarning",
    "RiskPromise",
    "RiskTarget",
    "ThresholdFamily",
    "VectorSearch",
    "__version__",
    "build_table",
    "build_table_from_predictions",
    "calibrate",
    "calibrate_pareto",
    "calibrate_predictions",
    "calibrate_table",
    "certify_cvar",
    "evaluate",
    "evaluate_vectors",
    "exceedance_losses",
    "exceedance_per_exit",
    "family_table",
    "get_procedure",
    "load_policy",
    "monotonicity_check",
    "pareto_test",
    "pareto_test_table",
]
