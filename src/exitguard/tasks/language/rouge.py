"""ROUGE-L F1 on token sequences, and the per-sample losses of early-exit generation.

ROUGE-L compares two sequences through their longest common subsequence (LCS):
``P = LCS / len(candidate)``, ``R = LCS / len(reference)``, ``F1 = 2PR / (P + R)``
(two empty sequences score 1). The LCS uses a bit-parallel algorithm (Allison-Dix, in
Hyyrö's form): one pass over the candidate with Python integers as bit vectors.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
from numpy.typing import NDArray


def lcs_length(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the longest common subsequence of ``a`` and ``b``.

    >>> lcs_length("ABCBDAB", "BDCABA")
    4
    """
    if len(a) < len(b):
        a, b = b, a  # bit vectors over the longer sequence
    if not b:
        return 0
    matches: dict[Hashable, int] = {}
    for position, symbol in enumerate(a):
        matches[symbol] = matches.get(symbol, 0) | (1 << position)
    full = (1 << len(a)) - 1
    row = full  # bit i set: the LCS did not grow at column i yet
    for symbol in b:
        hits = row & matches.get(symbol, 0)
        row = ((row + hits) | (row - hits)) & full
    return len(a) - row.bit_count()


def rouge_l_f1(candidate: Sequence[Hashable], reference: Sequence[Hashable]) -> float:
    """ROUGE-L F1 of ``candidate`` against ``reference``, in [0, 1]; 1 for two empty ones.

    LCS 3 of lengths 4 and 5: P = 3/4, R = 3/5, F1 = 2/3.

    >>> round(rouge_l_f1([1, 2, 3, 4], [1, 9, 2, 3, 9]), 6)
    0.666667
    """
    if not candidate and not reference:
        return 1.0
    common = lcs_length(candidate, reference)
    if common == 0:
        return 0.0
    precision, recall = common / len(candidate), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def token_disagreement(candidate: Sequence[Hashable], reference: Sequence[Hashable]) -> float:
    """Share of positions where two token sequences differ, in [0, 1].

    Positions beyond the shorter sequence count as disagreements; two empty ones give 0.

    >>> token_disagreement([1, 2, 3], [1, 5, 3, 4])
    0.5
    """
    longest = max(len(candidate), len(reference))
    if longest == 0:
        return 0.0
    same = sum(x == y for x, y in zip(candidate, reference, strict=False))
    return 1.0 - same / longest


def rouge_matrix(
    candidates: Sequence[Sequence[Sequence[Hashable]]], references: Sequence[Sequence[Hashable]]
) -> NDArray[np.float64]:
    """ROUGE-L F1 of ``candidates[k][i]`` against ``references[i]``; shape (K, n)."""
    # A loop over (policy, sample) pairs: every pair is one sequential LCS.
    return np.array(
        [[rouge_l_f1(c, r) for c, r in zip(row, references, strict=True)] for row in candidates],
        dtype=np.float64,
    )
