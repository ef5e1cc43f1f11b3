"""The language-model threshold sweep on a Ray cluster.

Work items are the cells of :func:`exitguard.tasks.language.sweep.sweep`: a batch of prompts
(the same batches: sorted by length, ``batch_size`` at a time) x a group of thresholds
(``thresholds_per_batch``, default all K), decoded greedily in one call. The losses (ROUGE-L
and token disagreement against row 0, the full model, and the performance gap against the
references) are computed on the driver from the merged outputs, by the same code as the
single-process sweep; so the merged table equals the single-process one bit for bit, except
``seconds`` (wall time).

The decoder and its exit heads travel as safetensors bytes with their configurations as JSON
(:class:`~exitguard.distributed.models.ModelPayload`); workers need no model files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from numpy.typing import NDArray

from exitguard.distributed.jobs import CellJob, cell_items
from exitguard.distributed.merge import merge_table
from exitguard.distributed.models import ModelPayload
from exitguard.distributed.options import RunOptions
from exitguard.distributed.runner import Worker, WorkItem, run_and_merge
from exitguard.distributed.shards import ShardStore

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typed **options (PEP 692; typing has it from 3.11)


def causal_lm(config: Mapping[str, Any], attn_implementation: str | None = None) -> Any:
    """A transformers causal LM of ``config`` (``model.config.to_json_string()`` as a dict)."""
    import transformers

    settings = dict(config)
    model_type = settings.pop("model_type")
    built = transformers.AutoConfig.for_model(model_type, **settings)
    model = transformers.AutoModelForCausalLM.from_config(
        built, attn_implementation=attn_implementation, dtype=torch.float32
    )
    return model


def exit_heads(config: Mapping[str, Any]) -> Any:
    """:class:`~exitguard.tasks.language.heads.ExitHeads` of a configuration dict."""
    from exitguard.tasks.language.heads import ExitHeads, ExitHeadsConfig

    settings = dict(config)
    settings["exit_layers"] = tuple(settings["exit_layers"])
    return ExitHeads(ExitHeadsConfig(**settings))


def lm_payloads(lm: Any) -> tuple[ModelPayload, ModelPayload]:
    """The payloads of an :class:`~exitguard.tasks.language.decode.EarlyExitLM`'s decoder and
    exit heads."""
    model, heads = lm.model, lm.heads
    if heads is None:
        raise ValueError("`lm` must have exit heads to sweep thresholds.")
    config = json.loads(model.config.to_json_string(use_diff=False))
    attention = getattr(model.config, "_attn_implementation", None)
    decoder = ModelPayload.of(
        model,
        factory=f"{__name__}:causal_lm",
        arguments={"config": config, "attn_implementation": attention},
    )
    head_payload = ModelPayload.of(
        heads, factory=f"{__name__}:exit_heads", arguments={"config": heads.config.to_dict()}
    )
    return decoder, head_payload


def _tokens_sha256(sequences: Sequence[Sequence[int]] | None) -> str | None:
    if sequences is None:
        return None
    text = json.dumps([[int(t) for t in s] for s in sequences])
    return hashlib.sha256(text.encode()).hexdigest()


class _LMWorker(Worker):
    def __init__(
        self, model: ModelPayload, heads: ModelPayload, settings: Mapping[str, Any]
    ) -> None:
        self.model, self.heads, self.settings = model.light(), heads.light(), dict(settings)

    def setup(self, weights: Mapping[str, bytes]) -> None:
        from exitguard.tasks.language.decode import EarlyExitLM

        model = self.model.build(weights=weights["model"])
        heads: Any = self.heads.build(weights=weights["heads"])
        self.lm = EarlyExitLM(model, heads)

    def compute(
        self, item: WorkItem, inputs: Mapping[str, Any]
    ) -> tuple[dict[str, NDArray[Any]], dict[str, Any]]:
        from exitguard.tasks.language.sweep import decode_cell

        cell = decode_cell(
            self.lm, inputs["prompts"], thresholds=inputs["thresholds"], **self.settings
        )
        arrays = {
            "tokens": cell.tokens,
            "output_lengths": cell.output_lengths,
            "lengths": cell.lengths,
            "cost": cell.cost,
            "layers": cell.layers,
        }
        return arrays, {"row_seconds": cell.seconds.tolist()}


class LMSweepJob(CellJob):
    """The cells of a language-model sweep; see :func:`lm_sweep` for the parameters."""

    def __init__(
        self,
        lm: Any,
        prompts: Sequence[Sequence[int]],
        *,
        thresholds: Sequence[float] | NDArray[np.float64] | None = None,
        references: Sequence[Sequence[int]] | None = None,
        max_new_tokens: int = 32,
        batch_size: int = 8,
        thresholds_per_batch: int | None = None,
        confidence: str = "learned",
        decay: float = 0.0,
        kv_fill: str = "propagate",
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
    ) -> None:
        from exitguard.risk.exits import as_threshold_grid
        from exitguard.tasks.diffusion.sweep import threshold_groups
        from exitguard.tasks.language.decode import EarlyExitLM
        from exitguard.tasks.language.sweep import (
            check_prompts,
            lm_thresholds,
            prompt_batches,
            sweep_settings,
        )

        if not isinstance(lm, EarlyExitLM):
            raise TypeError(f"`lm` must be an EarlyExitLM; got {type(lm).__name__}.")
        self.grid = as_threshold_grid(
            lm_thresholds(confidence) if thresholds is None else thresholds
        )
        self.prompts, self.references = check_prompts(prompts, references)
        self.decoder, self.head_payload = lm_payloads(lm)
        self.n_layers = lm.n_layers
        pad = pad_token_id if pad_token_id is not None else (eos_token_id or 0)
        self.cell_settings = {
            "max_new_tokens": max_new_tokens,
            "confidence": confidence,
            "decay": decay,
            "kv_fill": kv_fill,
            "eos_token_id": eos_token_id,
            "pad_token_id": pad,
        }
        self.settings = sweep_settings(
            lm,
            confidence=confidence,
            decay=decay,
            kv_fill=kv_fill,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
        self.batch_size, self.thresholds_per_batch = batch_size, thresholds_per_batch
        batches = prompt_batches(self.prompts, batch_size)
        groups = threshold_groups(self.grid.size, thresholds_per_batch)
        self._items = cell_items(batches, groups)

    def description(self) -> dict[str, Any]:
        return {
            "kind": "lm-sweep",
            "model": self.decoder.describe(),
            "heads": self.head_payload.describe(),
            "prompts_sha256": _tokens_sha256(self.prompts),
            "references_sha256": _tokens_sha256(self.references),
            **self.cell_settings,
            **self.cell_description(),
        }

    def inputs(self, item: WorkItem, store: ShardStore) -> dict[str, Any]:
        rows = item.rows if item.rows is not None else np.arange(self.grid.size)
        return {
            "prompts": [self.prompts[i] for i in item.sample_ids.tolist()],
            "thresholds": self.grid[rows],
        }

    def worker(self) -> Worker:
        return _LMWorker(self.decoder, self.head_payload, self.cell_settings)

    def weights(self) -> dict[str, bytes]:
        return {"model": self.decoder.weights, "heads": self.head_payload.weights}

    def merge(self, store: ShardStore, *, seconds: float) -> Any:
        from exitguard.tasks.language.sweep import ragged_outputs, table_from_outputs

        shards = store.shards()
        k, n = self.grid.size, len(self.prompts)
        merged = merge_table(shards, sample_ids=np.arange(n), n_rows=k)
        row_seconds = np.zeros(k)
        for shard in shards:  # a loop over shards: their rows' wall time
            if shard.rows is not None:
                row_seconds[shard.rows] += np.asarray(shard.meta["row_seconds"])
        return table_from_outputs(
            ragged_outputs(merged["tokens"], merged["output_lengths"]),
            thresholds=self.grid,
            references=self.references,
            cost=merged["cost"],
            layers=merged["layers"],
            tokens=merged["lengths"],
            seconds=row_seconds,
            n_layers=self.n_layers,
            settings=self.settings,
        )


def lm_sweep(
    lm: Any,
    prompts: Sequence[Sequence[int]],
    *,
    thresholds: Sequence[float] | NDArray[np.float64] | None = None,
    references: Sequence[Sequence[int]] | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    thresholds_per_batch: int | None = None,
    confidence: str = "learned",
    decay: float = 0.0,
    kv_fill: str = "propagate",
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    **options: Unpack[RunOptions],
) -> Any:
    """:func:`exitguard.tasks.language.sweep.sweep` on a Ray cluster.

    Parameters
    ----------
    lm : EarlyExitLM
    prompts, thresholds, references, max_new_tokens, batch_size, thresholds_per_batch,
    confidence, decay, kv_fill, eos_token_id, pad_token_id
        As in :func:`exitguard.tasks.language.sweep.sweep`.
    **options : RunOptions
        ``address``, ``workers``, ``threads``, ``shards``, ``retries``, ``progress`` and
        ``log``: see :func:`exitguard.distributed.run`.

    Returns
    -------
    SweepTable
        Equal, bit for bit, to the single-process sweep with the same arguments on the same
        hardware, except ``seconds`` (each row's share of the wall time of its cells).
    """
    job = LMSweepJob(
        lm,
        prompts,
        thresholds=thresholds,
        references=references,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        thresholds_per_batch=thresholds_per_batch,
        confidence=confidence,
        decay=decay,
        kv_fill=kv_fill,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    return run_and_merge(job, **options)
