"""Validity over repeated calibration draws from populations with a known risk per row.

Each population is a grid of K rows with true risks R_k: a plateau at or below epsilon, then a
plateau just above it (the hardest case for a high-probability bound: a violation needs one
barely-bad row to pass), then rising risks. Every draw is a fresh calibration table of n
i.i.d. samples; the chosen row's *true* risk is compared with epsilon.

* UCB (each bound) and LTT: the violation count must be consistent with a rate <= delta
  (one-sided binomial test at level 0.001 per configuration).
* CRC: the mean true risk of the chosen row must be <= epsilon within Monte-Carlo error.
* naive: shown to violate far more often than delta where it must.

The short versions and the long ones (5000 draws per configuration, n in {100, 1000}, about
a minute and a half on two cores) all run in CI.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from exitguard.evaluation import selections

DELTA = 0.1
HIGH_PROBABILITY = ["ucb-hoeffding", "ucb-hb", "ucb-wsr", "ltt", "ltt-bonferroni"]


def true_risks(eps: float, rows: int = 30) -> np.ndarray:
    below = np.linspace(0.0, eps, rows // 3)
    plateau = np.full(rows // 3, eps * 1.05)
    rising = np.linspace(eps * 1.1, min(3 * eps, 0.9), rows - 2 * (rows // 3))
    return np.concatenate([below, plateau, rising])


def draw(kind: str, risks: np.ndarray, n: int, draws: int, rng: np.random.Generator):
    """Calibration tables (draws, K, n) whose rows have mean exactly ``risks`` (times B)."""
    u = rng.random((draws, 1, n))
    if kind == "zero-one":  # per-sample monotone 0-1 losses, B = 1
        return (u < risks[None, :, None]).astype(float), 1.0, risks
    if kind == "continuous":  # losses in [0, 1]: 2 R x with x uniform, mean R
        return 2.0 * risks[None, :, None] * u, 1.0, risks
    # Signed losses in {-B, 0, B}: an early exit loses with prob a_k and wins with prob b_k.
    bound = 2.0 if kind == "signed-brier" else 1.0
    wins = np.where(np.arange(len(risks)) > 0, 0.05, 0.0)
    v = rng.random((draws, 1, n))
    losses = (u < (risks + wins)[None, :, None]).astype(float) - (v < wins[None, :, None])
    return bound * losses, bound, bound * risks


def simulate(procedure: str, kind: str, eps: float, n: int, draws: int, seed: int):
    rng = np.random.default_rng(seed)
    # Losses of kind "signed-brier" are scaled by B = 2: their true risks are 2 x base, so the
    # base is built around eps / 2 to put the plateau just above eps itself (the hardest case).
    base = true_risks(eps / (2.0 if kind == "signed-brier" else 1.0))
    chosen = []
    for start in range(0, draws, 500):  # chunks bound memory at 500 tables
        size = min(500, draws - start)
        tables, bound, risks = draw(kind, base, n, size, rng)
        index, _ = selections(
            tables, np.array([eps]), procedure=procedure, delta=DELTA, loss_bound=bound
        )
        chosen.append(risks[index[:, 0]])
    return np.concatenate(chosen)


KINDS = ["zero-one", "continuous", "signed", "signed-brier"]


def check_high_probability(procedure, kind, eps, n, draws, seed):
    risk = simulate(procedure, kind, eps, n, draws, seed)
    violations = int(np.sum(risk > eps + 1e-12))
    p = stats.binomtest(violations, draws, DELTA, alternative="greater").pvalue
    assert p > 1e-3, f"{procedure} on {kind}: {violations}/{draws} violations (p = {p:.2g})"
    return violations / draws


def check_crc(kind, eps, n, draws, seed):
    risk = simulate("crc", kind, eps, n, draws, seed)
    error = risk.std(ddof=1) / np.sqrt(draws)
    assert risk.mean() <= eps + 3 * error, f"crc on {kind}: mean risk {risk.mean():.4f} > {eps}"
    return risk.mean()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("procedure", HIGH_PROBABILITY)
def test_high_probability_procedures_short(procedure, kind):
    if procedure == "ucb-binomial":
        pytest.skip("binomial needs 0-1 losses")
    eps = 0.1 if kind != "signed-brier" else 0.2
    check_high_probability(procedure, kind, eps, n=200, draws=400, seed=11)


def test_exact_binomial_bound_is_tight_but_valid():
    # On 0-1 losses the exact bound's violation rate sits close to delta from below.
    rate = check_high_probability("ucb-binomial", "zero-one", 0.1, n=300, draws=2000, seed=3)
    assert 0.03 < rate <= 0.12


@pytest.mark.parametrize("kind", KINDS)
def test_crc_short(kind):
    eps = 0.1 if kind != "signed-brier" else 0.2
    check_crc(kind, eps, n=100, draws=1000, seed=12)


def test_naive_violates_where_it_must():
    risk = simulate("naive", "zero-one", 0.1, n=200, draws=400, seed=13)
    violations = int(np.sum(risk > 0.1))
    assert stats.binomtest(violations, 400, DELTA, alternative="greater").pvalue < 1e-6


def test_harness_detects_a_broken_bound(monkeypatch):
    """The validity check has power: Hoeffding with an eighth of its width fails it."""
    from exitguard.risk import bounds

    original = bounds.hoeffding_p_value

    def too_optimistic(losses, alpha, *, loss_bound):
        return original(losses, alpha, loss_bound=loss_bound / 8)

    monkeypatch.setattr(bounds, "hoeffding_p_value", too_optimistic)
    with pytest.raises(AssertionError, match="violations"):
        check_high_probability("ucb-hoeffding", "signed", 0.1, n=200, draws=400, seed=11)


@pytest.mark.parametrize("n", [100, 1000])
@pytest.mark.parametrize("eps", [0.05, 0.15])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("procedure", [*HIGH_PROBABILITY, "ucb-binomial", "crc"])
def test_validity_long(procedure, kind, eps, n):
    if procedure == "ucb-binomial" and kind != "zero-one":
        pytest.skip("binomial needs 0-1 losses")
    eps = eps * (2 if kind == "signed-brier" else 1)
    if procedure == "crc":
        check_crc(kind, eps, n=n, draws=5000, seed=21)
    else:
        check_high_probability(procedure, kind, eps, n=n, draws=5000, seed=21)
