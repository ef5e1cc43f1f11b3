"""Loss and cost tables for early-exit generation, by sweeping a threshold grid.

Generation is iterative, so a policy changes the text it conditions on: the table comes from
generating every prompt once per candidate threshold (DESIGN.md). Row 0 of the grid is the full
model (threshold ``inf``), so its losses are zero by construction. Per-sample losses:

- ``consistency``: 1 - ROUGE-L F1 of the output against the full model's output, in [0, 1];
- ``disagreement``: share of token positions that differ from the full model's, in [0, 1];
- ``gap`` (when references exist, e.g. the true next verse): Q(full) - Q(policy) with
  Q = ROUGE-L F1 against the reference, in [-1, 1].

Costs: compute per generated token in layer-equivalents (layers run plus deciding: exit heads,
confidences, vocabulary heads, cache filling), the mean exit depth, and seconds.

The table is written in the risk core's npz format (``losses``, ``cost``, ``thresholds``), so
``exitguard calibrate`` and ``exitguard evaluate`` read it unchanged; the other losses and
costs ride along as extra keys.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from exitguard._files import atomic_write
from exitguard.risk._validation import check_int
from exitguard.tasks.language.decode import EarlyExitLM
from exitguard.tasks.language.rouge import rouge_l_f1, token_disagreement

RISKS = ("consistency", "disagreement", "gap")


def lm_thresholds(confidence: str = "learned", *, count: int = 20) -> NDArray[np.float64]:
    """A grid for a confidence measure: ``inf`` (the full model), 1, then ``count - 1`` values
    down to 0, spaced geometrically in ``1 - threshold`` (dense near 1, where low risks live).

    The gaps ``1 - threshold`` run from 1e-3 (softmax, margin, learned) or 1e-5 (``state``:
    the cosine of consecutive residual states is close to 1 for most tokens) up to 1.

    >>> lm_thresholds(count=4).tolist()
    [inf, 1.0, 0.999, 0.96837722, 0.0]
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 2:
        raise ValueError(f"`count` must be an integer >= 2; got {count!r}.")
    smallest = 1e-5 if confidence == "state" else 1e-3
    gaps = np.geomspace(smallest, 1.0, count - 1)  # (count - 1,)
    return np.concatenate([[math.inf, 1.0], np.round(1.0 - gaps, 8)])


@dataclasses.dataclass(frozen=True)
class SweepTable:
    """Losses and costs of every prompt under every threshold.

    Attributes
    ----------
    thresholds : array of shape (K,)
        The grid, ``thresholds[0] = inf`` (the full model), then decreasing.
    consistency, disagreement : arrays of shape (K, n)
        Per-sample losses against the full model's output (row 0 is zero).
    gap : array of shape (K, n) or None
        Performance gap against references (ROUGE-L F1), when references were given.
    quality : array of shape (K, n) or None
        ROUGE-L F1 against the references.
    cost : array of shape (K, n)
        Layer-equivalents per generated token (deciding and cache filling included).
    layers : array of shape (K, n)
        Mean depth of the exit taken per generated token, in decoder layers.
    tokens : int array of shape (K, n)
        Generated tokens per sample.
    seconds : array of shape (K,)
        Wall time spent on each threshold (prefill shared evenly).
    n_layers : int
        Decoder layers of the model (the full depth).
    settings : dict
        Confidence measure, decay, kv_fill, max_new_tokens, and so on (JSON-ready).
    """

    thresholds: NDArray[np.float64]
    consistency: NDArray[np.float64]
    disagreement: NDArray[np.float64]
    gap: NDArray[np.float64] | None
    quality: NDArray[np.float64] | None
    cost: NDArray[np.float64]
    layers: NDArray[np.float64]
    tokens: NDArray[np.int64]
    seconds: NDArray[np.float64]
    n_layers: int
    settings: dict[str, Any]

    def losses(self, risk: str = "consistency") -> NDArray[np.float64]:
        """The (K, n) losses of one of :data:`RISKS`."""
        if risk not in RISKS:
            raise ValueError(f"`risk` must be one of {RISKS}; got {risk!r}.")
        table = getattr(self, risk)
        if table is None:
            raise ValueError("`risk='gap'` needs references; the sweep had none.")
        return table

    def __repr__(self) -> str:
        k, n = self.consistency.shape
        return (
            f"SweepTable(K={k}, n={n}, mean_layers={np.round(self.layers.mean(1), 2).tolist()}, "
            f"mean_consistency={np.round(self.consistency.mean(1), 3).tolist()})"
        )

    def save(self, path: str | os.PathLike[str], *, risk: str = "consistency") -> Path:
        """Write the table as npz: ``losses`` (the chosen risk), ``cost``, ``thresholds``, extras.

        Extra keys: ``loss_consistency``, ``loss_disagreement``, ``loss_gap`` and ``quality``
        (with references), ``layers``, ``tokens``, ``seconds``, ``risk`` and ``settings``
        (a JSON string); and the decoding a policy calibrated on the table belongs to:
        ``model_fingerprint`` (model, heads, exits, decay, kv_fill; see
        :mod:`~exitguard.tasks.language.binding`), ``n_exits`` and ``confidence_name``. The
        file is written atomically (see :mod:`exitguard._files`).
        """
        arrays: dict[str, Any] = {
            "losses": self.losses(risk),
            "cost": self.cost,
            "thresholds": self.thresholds,
            "loss_consistency": self.consistency,
            "loss_disagreement": self.disagreement,
            "layers": self.layers,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "n_layers": np.int64(self.n_layers),
            "risk": np.str_(risk),
            "loss_bound": np.float64(1.0),
            "settings": np.str_(json.dumps(self.settings, sort_keys=True)),
        }
        if self.gap is not None and self.quality is not None:
            arrays["loss_gap"] = self.gap
            arrays["quality"] = self.quality
        fields = self.policy_fields()
        if fields:
            arrays["model_fingerprint"] = np.str_(fields["model_fingerprint"])
            arrays["n_exits"] = np.int64(fields["n_exits"])
            arrays["confidence_name"] = np.str_(fields["confidence"])
        return atomic_write(
            path, lambda handle: np.savez_compressed(handle, **arrays), argument="path"
        )

    def policy_fields(self) -> dict[str, Any]:
        """What a policy calibrated on this table records (``policy.with_model(**fields)``).

        Empty for tables swept before the binding was recorded.
        """
        binding = self.settings.get("model_fingerprint")
        if binding is None:
            return {}
        return {
            "n_exits": int(self.settings["n_exits"]),
            "model_fingerprint": str(binding),
            "confidence": str(self.settings["confidence"]),
        }

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SweepTable:
        """Read a table written by :meth:`save`."""
        with np.load(Path(path), allow_pickle=False) as data:
            return cls(
                thresholds=data["thresholds"],
                consistency=data["loss_consistency"],
                disagreement=data["loss_disagreement"],
                gap=data["loss_gap"] if "loss_gap" in data else None,
                quality=data["quality"] if "quality" in data else None,
                cost=data["cost"],
                layers=data["layers"],
                tokens=data["tokens"],
                seconds=data["seconds"],
                n_layers=int(data["n_layers"]),
                settings=json.loads(str(data["settings"])),
            )


def prompt_set(
    tokenizer: Any, corpus: str, *, n: int, seed: int, max_prompt_tokens: int = 96
) -> tuple[list[list[int]], list[list[int]]]:
    """``n`` prompts drawn from a corpus (seeded), each with the next passage as reference.

    A prompt is one passage (a verse, a paragraph) and a newline, cut to its last
    ``max_prompt_tokens`` tokens; its reference is the passage that follows.
    """
    from exitguard.data.text import text_passages

    passages = text_passages(corpus)
    if len(passages) < 2:
        raise ValueError(f"corpus {corpus!r} has too few passages for prompts.")
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(passages) - 1, size=min(n, len(passages) - 1), replace=False)
    prompts, references = [], []
    for i in sorted(picks.tolist()):
        ids = tokenizer(passages[i] + "\n", add_special_tokens=False)["input_ids"]
        prompts.append(ids[-max_prompt_tokens:])
        references.append(tokenizer(passages[i + 1], add_special_tokens=False)["input_ids"])
    return prompts, references


def left_pad(prompts: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of ragged prompts, left-padded to the longest: (b, P) each."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)  # (b, P)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (b, P)
    for row, prompt in enumerate(prompts):  # a loop over the batch: ragged prompts
        ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def _trim(tokens: torch.Tensor, length: int, eos: int | None) -> list[int]:
    out = tokens[:length].tolist()
    if eos is not None and out and out[-1] == eos:
        out = out[:-1]
    return out


def check_prompts(
    prompts: Sequence[Sequence[int]], references: Sequence[Sequence[int]] | None
) -> tuple[list[list[int]], list[list[int]] | None]:
    """``prompts`` and ``references`` as lists of token ids, checked: at least one prompt,
    none empty, and one reference per prompt (when given)."""
    checked = [[int(t) for t in p] for p in prompts]
    n = len(checked)
    if n == 0 or any(len(p) == 0 for p in checked):
        raise ValueError("`prompts` must be a non-empty list of non-empty token sequences.")
    if references is not None and len(references) != n:
        raise ValueError(
            f"`references` must have one entry per prompt ({n}); got {len(references)}."
        )
    return checked, None if references is None else [list(r) for r in references]


def prompt_batches(prompts: Sequence[Sequence[int]], batch_size: int) -> list[NDArray[np.int64]]:
    """The prompt indices of each batch: sorted by length (stable), ``batch_size`` at a time.

    >>> [b.tolist() for b in prompt_batches([[1, 2, 3], [4], [5, 6]], 2)]
    [[1, 2], [0]]
    """
    check_int(batch_size, "batch_size")
    order = np.argsort([len(p) for p in prompts], kind="stable")  # similar lengths together
    return [order[i : i + batch_size] for i in range(0, len(prompts), batch_size)]


@dataclasses.dataclass(frozen=True, repr=False)
class DecodeCell:
    """What one call of :func:`decode_cell` gives: ``k`` thresholds x ``b`` prompts.

    Attributes
    ----------
    tokens : int64 array of shape (k, b, max_new_tokens)
        The outputs (end-of-sequence token removed), padded with -1.
    output_lengths : int64 array of shape (k, b)
        Tokens of each output.
    lengths : int64 array of shape (k, b)
        Generated tokens, the end-of-sequence token included (``SweepTable.tokens``).
    cost, layers : float64 arrays of shape (k, b)
        Layer-equivalents and mean exit depth per generated token.
    seconds : float64 array of shape (k,)
        The call's wall time, shared by the thresholds in proportion to their tokens.
    """

    tokens: NDArray[np.int64]
    output_lengths: NDArray[np.int64]
    lengths: NDArray[np.int64]
    cost: NDArray[np.float64]
    layers: NDArray[np.float64]
    seconds: NDArray[np.float64]

    def __repr__(self) -> str:
        k, b, _ = self.tokens.shape
        return f"DecodeCell(thresholds={k}, prompts={b})"

    def outputs(self) -> list[list[list[int]]]:
        """``outputs[r][j]``: the output of prompt ``j`` under threshold ``r``."""
        return ragged_outputs(self.tokens, self.output_lengths)


def ragged_outputs(tokens: NDArray[np.int64], lengths: NDArray[np.int64]) -> list[list[list[int]]]:
    """The outputs ``tokens[r, j, :lengths[r, j]]`` of padded tokens (k, b, T) as token lists
    ``[r][j]`` (threshold ``r``, prompt ``j``)."""
    k, b, _ = tokens.shape
    return [
        [tokens[r, j, : lengths[r, j]].tolist() for j in range(b)]
        for r in range(k)  # a loop over (threshold, prompt): ragged outputs
    ]


def decode_cell(
    lm: EarlyExitLM,
    prompts: Sequence[Sequence[int]],
    *,
    thresholds: Sequence[float] | NDArray[np.float64],
    max_new_tokens: int,
    confidence: str,
    decay: float,
    kv_fill: str,
    eos_token_id: int | None,
    pad_token_id: int,
) -> DecodeCell:
    """Decode ``b`` prompts under ``k`` thresholds in ONE call (``k * b`` rows sharing the
    prompts' prefill): the unit of work of :func:`sweep` and of a distributed sweep."""
    ids, mask = left_pad(prompts, pad_token_id)
    grid = torch.as_tensor(np.asarray(thresholds, dtype=np.float64))  # (k,)
    result = lm.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        threshold=grid,
        confidence=confidence,
        decay=decay,
        kv_fill=kv_fill,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    k, b = grid.numel(), len(prompts)
    lengths = result.lengths.view(k, b)  # (k, b)
    depth = result.layers.view(k, b, -1).sum(-1) / lengths.clamp(min=1)  # (k, b)
    # The rows of a threshold share the call's time in proportion to their tokens.
    share = lengths.sum(-1).double() / lengths.sum().clamp(min=1)  # (k,)
    tokens = np.full((k, b, max_new_tokens), -1, dtype=np.int64)
    output_lengths = np.zeros((k, b), dtype=np.int64)
    for row in range(k * b):  # a loop over rows: ragged outputs
        out = _trim(result.tokens[row], int(result.lengths[row]), eos_token_id)
        tokens[row // b, row % b, : len(out)] = out
        output_lengths[row // b, row % b] = len(out)
    return DecodeCell(
        tokens=tokens,
        output_lengths=output_lengths,
        lengths=lengths.numpy().astype(np.int64),
        cost=result.cost.view(k, b).numpy().astype(np.float64),
        layers=depth.numpy().astype(np.float64),
        seconds=(result.seconds * share).numpy(),
    )


def table_from_outputs(
    outputs: Sequence[Sequence[Sequence[int]]],
    *,
    thresholds: NDArray[np.float64],
    references: Sequence[Sequence[int]] | None,
    cost: NDArray[np.float64],
    layers: NDArray[np.float64],
    tokens: NDArray[np.int64],
    seconds: NDArray[np.float64],
    n_layers: int,
    settings: dict[str, Any],
) -> SweepTable:
    """The :class:`SweepTable` of complete outputs ``outputs[k][i]`` (K x n token lists):
    the losses against row 0 (the full model) and the references."""
    full = outputs[0]
    consistency = np.array(
        [
            [1.0 - rouge_l_f1(out, ref) for out, ref in zip(row, full, strict=True)]
            for row in outputs
        ]
    )
    disagreement = np.array(
        [
            [token_disagreement(out, ref) for out, ref in zip(row, full, strict=True)]
            for row in outputs
        ]
    )
    gap = quality = None
    if references is not None:
        quality = np.array(
            [
                [rouge_l_f1(out, list(ref)) for out, ref in zip(row, references, strict=True)]
                for row in outputs
            ]
        )
        gap = quality[0][None, :] - quality  # (K, n), in [-1, 1]
    return SweepTable(
        thresholds=thresholds,
        consistency=consistency,
        disagreement=disagreement,
        gap=gap,
        quality=quality,
        cost=cost,
        layers=layers,
        tokens=tokens,
        seconds=seconds,
        n_layers=n_layers,
        settings=settings,
    )


def sweep_settings(
    lm: EarlyExitLM,
    *,
    confidence: str,
    decay: float,
    kv_fill: str,
    max_new_tokens: int,
    batch_size: int,
) -> dict[str, Any]:
    """The ``settings`` a sweep records (JSON-ready)."""
    return {
        "confidence": confidence,
        "decay": decay,
        "kv_fill": kv_fill,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "exit_layers": list(lm.exit_layers),
        "cost_unit": "decoder-layer multiply-adds per generated token",
        # What a policy calibrated on the table must be bound to (see binding.py).
        "model_fingerprint": lm.binding(decay=decay, kv_fill=kv_fill).fingerprint(),
        "n_exits": lm.n_exits,
    }


def sweep(
    lm: EarlyExitLM,
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
    progress: bool = True,
) -> SweepTable:
    """Generate every prompt under every threshold (greedy) and tabulate losses and costs.

    Parameters
    ----------
    lm : EarlyExitLM
        The model with trained exit heads.
    prompts : sequence of token-id sequences
        The n prompts (no padding).
    thresholds : array of shape (K,), optional
        Strictly decreasing grid; ``inf`` (the full model) is put in front when missing.
        Defaults to :func:`lm_thresholds` for the confidence measure.
    references : sequence of token-id sequences, optional
        A reference continuation per prompt, for the ``gap`` loss.
    max_new_tokens, batch_size : int
        Tokens per output; prompts per batch (each batch decodes all K thresholds at once, as
        ``K * batch_size`` rows sharing the prompts' prefill).
    thresholds_per_batch : int, optional
        Thresholds per call (default: all K). The table is computed cell by cell
        (:func:`decode_cell`: a batch of prompts x a group of thresholds); a distributed sweep
        with the same cells gives the same table (timings aside) bit for bit.
    confidence, decay, kv_fill
        As in :meth:`EarlyExitLM.generate`.
    eos_token_id, pad_token_id : int, optional
        End of sequence (outputs stop there) and padding.
    progress : bool
        Show a progress bar.

    Returns
    -------
    SweepTable
    """
    from tqdm.auto import tqdm

    from exitguard.risk.exits import as_threshold_grid
    from exitguard.tasks.diffusion.sweep import threshold_groups

    grid = as_threshold_grid(lm_thresholds(confidence) if thresholds is None else thresholds)
    prompts, references = check_prompts(prompts, references)
    n = len(prompts)
    batches = prompt_batches(prompts, batch_size)
    groups = threshold_groups(grid.size, thresholds_per_batch)
    n_grid = grid.size
    pad = pad_token_id if pad_token_id is not None else (eos_token_id or 0)
    outputs: list[list[list[int]]] = [[[] for _ in range(n)] for _ in range(n_grid)]
    cost = np.zeros((n_grid, n))
    layers = np.zeros((n_grid, n))
    tokens = np.zeros((n_grid, n), dtype=np.int64)
    seconds = np.zeros(n_grid)

    for chunk in tqdm(batches, desc=f"sweep {n_grid} thresholds", disable=not progress):
        for rows in groups:  # a loop over the few groups of thresholds
            cell = decode_cell(
                lm,
                [prompts[i] for i in chunk],
                thresholds=grid[rows],
                max_new_tokens=max_new_tokens,
                confidence=confidence,
                decay=decay,
                kv_fill=kv_fill,
                eos_token_id=eos_token_id,
                pad_token_id=pad,
            )
            cost[rows[:, None], chunk[None, :]] = cell.cost
            layers[rows[:, None], chunk[None, :]] = cell.layers
            tokens[rows[:, None], chunk[None, :]] = cell.lengths
            seconds[rows] += cell.seconds
            for r, row_outputs in zip(rows, cell.outputs(), strict=True):  # ragged outputs
                for i, out in zip(chunk, row_outputs, strict=True):
                    outputs[r][i] = out

    settings = sweep_settings(
        lm,
        confidence=confidence,
        decay=decay,
        kv_fill=kv_fill,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    return table_from_outputs(
        outputs,
        thresholds=grid,
        references=references,
        cost=cost,
        layers=layers,
        tokens=tokens,
        seconds=seconds,
        n_layers=lm.n_layers,
        settings=settings,
    )
