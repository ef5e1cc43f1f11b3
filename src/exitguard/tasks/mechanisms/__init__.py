"""Early-exit mechanisms beyond branch exits, each certified: cascades, anytime budgets,
learned halting and layer skipping, compared side by side on the same data.

The pieces, in the order they are used:

- :class:`MechanismTable`, :func:`exit_rule_table`, :func:`budget_table`, :func:`config_table`
  (``tables``, numpy only): a mechanism's loss and cost tables (row 0 the full model), and
  :func:`certify` / :func:`evaluate_table` / :func:`budget_risk_curve`, the risk core on them;
- :func:`build_small_cnn`, :func:`build_skip_network`, :class:`FullModel` (``models``): the
  demo's architectures;
- :func:`load_or_train_member`, :func:`load_or_train_halting`, :func:`load_or_train_skipping`
  (``train``): each trained once and cached;
- :func:`branch_table`, :func:`cascade_table`, :func:`halting_table`, :func:`anytime_table`,
  :func:`skipping_table` (``collect``): the tables of the demo's models;
- :func:`run_demo` with :class:`DemoConfig` (``demo``): every mechanism certified at the same
  (epsilon, delta, n), timed for real, and reported (``report``).

The torch mechanisms themselves live in :mod:`exitguard.nn` (``Cascade``, ``AnytimeNetwork``,
``HaltingNetwork``, ``SkipNetwork``). Names here are imported lazily.
"""

from __future__ import annotations

from exitguard.tasks import lazy_exports

_EXPORTS = {
    "BudgetRiskCurve": "tables",
    "MechanismPolicy": "tables",
    "MechanismTable": "tables",
    "budget_risk_curve": "tables",
    "budget_table": "tables",
    "certify": "tables",
    "check_procedure": "tables",
    "config_table": "tables",
    "evaluate_table": "tables",
    "exit_rule_table": "tables",
    "FullModel": "models",
    "SkipConfig": "models",
    "SmallCNNConfig": "models",
    "build_skip_network": "models",
    "build_small_cnn": "models",
    "MechanismSettings": "train",
    "load_or_train_halting": "train",
    "load_or_train_member": "train",
    "load_or_train_skipping": "train",
    "mechanism_settings": "train",
    "anytime_table": "collect",
    "branch_table": "collect",
    "cascade_table": "collect",
    "halting_table": "collect",
    "skip_thresholds": "collect",
    "skipping_table": "collect",
    "DemoConfig": "demo",
    "Mechanism": "demo",
    "build_mechanisms": "demo",
    "compare_mechanisms": "demo",
    "run_demo": "demo",
    "write_mechanism_report": "report",
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
