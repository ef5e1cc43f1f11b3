"""Keeping a certified policy safe under drift: a stream whose images degrade over time.

- :func:`corrupt` (``corrupt``): rotation, noise or blur of growing severity;
- :func:`run_demo` with :class:`DemoConfig` (``demo``): audited serving, the anytime-valid
  monitor, fallback to the full model and recalibration, written as a report.

Everything here needs torch; names are imported lazily.
"""

from __future__ import annotations

from exitguard.tasks import lazy_exports

_EXPORTS = {
    "CORRUPTIONS": "corrupt",
    "corrupt": "corrupt",
    "DemoConfig": "demo",
    "prepare": "demo",
    "run_demo": "demo",
    "serve": "demo",
    "severity_schedule": "demo",
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
