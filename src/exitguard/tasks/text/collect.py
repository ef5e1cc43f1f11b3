"""Per-exit outputs, loss and cost tables, and timing of the text network.

The exit decision of a sentence does not change any other sentence's input, so the loss table
comes from one forward pass per sentence that keeps every exit's output
(:func:`exitguard.nn.collect`); every threshold is then evaluated on those outputs. The cost of
a sentence that leaves at exit ``e`` is its own FLOPs to exit ``e`` (longer sentences cost
more), from :func:`~exitguard.tasks.text.model.flops_by_length`.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from exitguard.calibration import build_table
from exitguard.nn import EarlyExitNetwork, ExitOutputs, collect
from exitguard.tasks.text.model import flops_by_length, length_batches, plain_logits, token_lengths


@dataclasses.dataclass(frozen=True, repr=False)
class TextOutputs:
    """Every exit's outputs on ``n`` sentences, with their lengths and FLOPs.

    Attributes
    ----------
    outputs : ExitOutputs
        Per-exit logits, probabilities, confidences and labels.
    lengths : int64 array of shape (n,)
        Tokens per sentence.
    flops_to_exit : float array of shape (n, L)
        FLOPs of each sentence up to and including each exit (heads on the way included).
    flops_full : float array of shape (n,)
        FLOPs of each sentence under the never-exit policy.
    """

    outputs: ExitOutputs
    lengths: NDArray[np.int64]
    flops_to_exit: NDArray[np.float64]
    flops_full: NDArray[np.float64]

    @property
    def probs(self) -> NDArray[np.float64]:
        return self.outputs.probs

    @property
    def labels(self) -> NDArray[np.int64]:
        if self.outputs.labels is None:
            raise ValueError("these outputs were collected without labels.")
        return self.outputs.labels

    @property
    def n_exits(self) -> int:
        return self.outputs.n_exits

    def __repr__(self) -> str:
        return (
            f"TextOutputs(n={self.outputs.n}, n_exits={self.n_exits}, "
            f"mean_length={self.lengths.mean():.1f})"
        )

    def subset(self, index: NDArray[np.integer[Any]]) -> TextOutputs:
        o = self.outputs
        return TextOutputs(
            outputs=ExitOutputs(
                logits=o.logits[index],
                probs=o.probs[index],
                confidences=o.confidences[index],
                labels=None if o.labels is None else o.labels[index],
                measure=o.measure,
            ),
            lengths=self.lengths[index],
            flops_to_exit=self.flops_to_exit[index],
            flops_full=self.flops_full[index],
        )


def collect_text(
    network: EarlyExitNetwork, tokens: Tensor, labels: Any = None, *, batch_size: int = 64
) -> TextOutputs:
    """Run the network on ``(n, 2, T)`` tokens and keep every exit's outputs and FLOPs."""
    outputs = collect(network, tokens, labels=labels, batch_size=batch_size)
    lengths = token_lengths(tokens)
    to_exit, full = flops_by_length(network, lengths)
    return TextOutputs(outputs, lengths, to_exit, full)


def text_tables(
    data: TextOutputs,
    *,
    risk: str,
    confidence: str = "max_softmax",
    seed: int = 0,
) -> dict[str, NDArray[Any]]:
    """Loss table of one risk and its per-sentence FLOPs cost table over the default grid.

    Returns ``losses`` (K, n), ``cost`` (K, n) in FLOPs, ``thresholds`` (K,) and ``exits``
    (K, n); row 0 is the full model, charged the encoder without intermediate heads.
    """
    tables = build_table(
        data.probs,
        data.labels if risk.endswith("gap") else None,
        risk=risk,
        confidence=confidence,
        rng=seed,
    )
    exits = tables["exits"]  # (K, n)
    cost = data.flops_to_exit[np.arange(exits.shape[1])[None, :], exits]  # (K, n)
    cost[np.isposinf(tables["thresholds"])] = data.flops_full
    return {**tables, "cost": cost}


def time_text(
    network: EarlyExitNetwork,
    encoder: torch.nn.Module,
    tokens: Tensor,
    thresholds: dict[str, float],
    *,
    batch_size: int,
    repeats: int,
    sort_by_length: bool = False,
) -> dict[str, float]:
    """Sentences per second of the plain ``transformers`` forward and of exit policies.

    All runs see the same sentences in the same batches (in order, or sorted by length) and
    are timed side by side: the median of ``repeats`` passes after a warm-up. Tokenisation is
    done beforehand and not timed.

    Parameters
    ----------
    network : EarlyExitNetwork
        The text network (its last head is the plain run's head).
    encoder : transformers.BertModel
        The encoder whose layers the network wraps.
    tokens : Tensor of shape (n, 2, T)
    thresholds : dict of name -> float
        The policies to time; ``math.inf`` is the network without early exit.

    Returns
    -------
    dict
        ``transformers`` and ``<name>`` in sentences per second, and ``<name> speed-up``
        against ``transformers``.
    """
    batches = length_batches(
        token_lengths(tokens), batch_size=batch_size, sort_by_length=sort_by_length
    )
    chunks = [tokens[torch.from_numpy(index)] for index in batches]
    head = network.heads[-1]

    @torch.inference_mode()
    def plain() -> None:
        for chunk in chunks:
            plain_logits(encoder, head, chunk)  # type: ignore[arg-type]

    def policy(threshold: float) -> Callable[[], None]:
        def run() -> None:
            for chunk in chunks:
                network.infer(chunk, threshold)

        return run

    runs = {"transformers": plain, **{name: policy(t) for name, t in thresholds.items()}}
    seconds = interleaved_seconds(runs, repeats=repeats)
    n = tokens.shape[0]
    result: dict[str, float] = {"batch_size": batch_size, "sentences": n}
    for name, value in seconds.items():
        result[name] = n / value
        if name != "transformers":
            result[f"{name} speed-up"] = seconds["transformers"] / value
    return result


def interleaved_seconds(runs: dict[str, Callable[[], Any]], *, repeats: int) -> dict[str, float]:
    """Median wall time of each run, timed in turns (one warm-up round, then ``repeats``).

    Taking turns spreads any change of the machine's load over all runs alike.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"`repeats` must be a positive integer; got {repeats!r}.")
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):  # rounds: every run once per round
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
