"""ROUGE-L F1 and token disagreement against hand-computed cases and a naive DP oracle."""

from __future__ import annotations

import random

import pytest

from exitguard.tasks.language.rouge import (
    lcs_length,
    rouge_l_f1,
    rouge_matrix,
    token_disagreement,
)


def _lcs_dp(a, b):
    """The textbook O(len(a) * len(b)) dynamic programme, kept only as an oracle."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = (
                table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
            )
    return table[-1][-1]


def test_lcs_matches_dynamic_programme():
    rng = random.Random(0)
    for _ in range(500):
        a = [rng.randrange(4) for _ in range(rng.randrange(0, 40))]
        b = [rng.randrange(4) for _ in range(rng.randrange(0, 40))]
        assert lcs_length(a, b) == _lcs_dp(a, b)


def test_rouge_hand_computed():
    # LCS("the cat sat on the mat", "the cat on the mat") = 5; P = 5/6, R = 1, F1 = 10/11.
    cand, ref = "the cat sat on the mat".split(), "the cat on the mat".split()
    assert rouge_l_f1(cand, ref) == pytest.approx(10 / 11)
    # LCS([1, 2, 3, 4], [2, 4, 5]) = 2: P = 1/2, R = 2/3, F1 = 4/7.
    assert rouge_l_f1([1, 2, 3, 4], [2, 4, 5]) == pytest.approx(4 / 7)
    assert rouge_l_f1([1, 2], [3, 4]) == 0.0
    assert rouge_l_f1([], []) == 1.0
    assert rouge_l_f1([], [1]) == 0.0
    assert rouge_l_f1([7, 8, 9], [7, 8, 9]) == 1.0


def test_rouge_is_symmetric_and_bounded():
    rng = random.Random(1)
    for _ in range(100):
        a = [rng.randrange(6) for _ in range(rng.randrange(1, 20))]
        b = [rng.randrange(6) for _ in range(rng.randrange(1, 20))]
        assert rouge_l_f1(a, b) == pytest.approx(rouge_l_f1(b, a))
        assert 0.0 <= rouge_l_f1(a, b) <= 1.0


def test_token_disagreement():
    assert token_disagreement([1, 2, 3], [1, 2, 3]) == 0.0
    assert token_disagreement([1, 2, 3], [1, 5, 3]) == pytest.approx(1 / 3)
    assert token_disagreement([1, 2], [1, 2, 3, 4]) == pytest.approx(0.5)  # tail counts
    assert token_disagreement([], []) == 0.0


def test_rouge_matrix_shape():
    table = rouge_matrix([[[1, 2], [3]], [[1], [3]]], [[1, 2], [3]])
    assert table.shape == (2, 2)
    assert table[0].tolist() == [1.0, 1.0]
    assert table[1, 0] == pytest.approx(2 / 3)
