"""Early-exit diffusion sampling with risk control (DeeDiff-style), on small image datasets.

The pieces, in the order they are used:

- :class:`Denoiser` (``model``): a small U-ViT noise predictor with an exit and an uncertainty
  estimation module (UEM) after every block;
- :func:`train_denoiser` / :func:`load_or_train` (``train``): DeeDiff's losses, cached;
- :func:`sample` (``sample``): ancestral DDPM sampling that exits early at every step with real
  batch compaction, :func:`simulate` its full-pass reference, :func:`sample_noise` the seeded
  noise that every threshold shares;
- :func:`ssim_loss`, :class:`FeatureDistance` (``losses``): bounded losses against the full
  model's image from the same noise;
- :func:`sweep` / :func:`write_table` (``sweep``): the loss and cost tables over a threshold
  grid, in the npz format ``exitguard calibrate`` reads;
- :func:`run_demo` with :class:`DemoConfig` (``demo``): everything end to end, as a results dict
  for :func:`exitguard.report.write_report`.

Everything here needs torch; names are imported lazily.
"""

from __future__ import annotations

from exitguard.tasks import lazy_exports

_EXPORTS = {
    "Denoiser": "model",
    "DenoiserConfig": "model",
    "ExitOutputs": "model",
    "exit_flops": "model",
    "DeeDiffLoss": "train",
    "TrainSettings": "train",
    "TrainHistory": "train",
    "deediff_loss": "train",
    "load_or_train": "train",
    "train_denoiser": "train",
    "SampleResult": "sample",
    "Schedule": "sample",
    "generate": "sample",
    "linear_betas": "sample",
    "sample": "sample",
    "sample_full": "sample",
    "sample_noise": "sample",
    "simulate": "sample",
    "to_unit": "sample",
    "LOSSES": "losses",
    "FeatureDistance": "losses",
    "ssim": "losses",
    "ssim_loss": "losses",
    "DiffusionSweep": "sweep",
    "grid_from_confidences": "sweep",
    "pilot_thresholds": "sweep",
    "sweep": "sweep",
    "write_table": "sweep",
    "DemoConfig": "demo",
    "run_demo": "demo",
    "write_demo_table": "demo",
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
