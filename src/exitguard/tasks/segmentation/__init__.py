"""Semantic segmentation with risk-controlled image-level exits (the paper's Section 4.2).

The pieces, in the order they are used:

- :func:`per_exit_losses` and the four risks (``losses``): miscoverage, mIoU gap and the
  mean-pixel Brier gap and consistency, per image;
- :class:`SegmenterConfig`, :func:`build_segmenter`, :func:`load_or_train` (``model``): a
  small encoder-decoder with a dense exit after every stage, trained jointly and cached;
- :func:`confidence_measures`, :func:`collect_segmentation`, :func:`segmentation_tables`
  (``collect``): per-pixel confidences aggregated per image, one pass over held-out scenes,
  and the loss/FLOPs/exit tables;
- :func:`run_demo` with :class:`DemoConfig` (``demo``): every risk and procedure over repeated
  splits, the paper's Table 1, one policy run for real, and the report.

Everything here needs torch; names are imported lazily.
"""

from __future__ import annotations

from exitguard.tasks import lazy_exports

_EXPORTS = {
    "PolicyRun": "demo",
    "picture_grid": "demo",
    "run_policy": "demo",
    "savings_tables": "demo",
    "evaluate_risks": "demo",
    "GRID_STEP": "collect",
    "CACHE_FORMAT": "model",
    "DemoConfig": "demo",
    "LOSS_BOUNDS": "losses",
    "Prepared": "demo",
    "RISK_TITLES": "losses",
    "SEGMENTATION_RISKS": "losses",
    "SegmentationOutputs": "collect",
    "SegmenterConfig": "model",
    "SegmenterTraining": "model",
    "TABLE_TARGET_RISKS": "demo",
    "TARGET_RISKS": "demo",
    "build_segmenter": "model",
    "collect_segmentation": "collect",
    "confidence_measures": "collect",
    "load_or_train": "model",
    "mean_iou": "losses",
    "mean_pixel_brier": "losses",
    "miscoverage": "losses",
    "per_exit_losses": "losses",
    "prepare": "demo",
    "run_demo": "demo",
    "sample_pixel_labels": "losses",
    "scenes_for": "demo",
    "segmentation_tables": "collect",
    "table_one": "demo",
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
