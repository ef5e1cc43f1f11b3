"""Validity of Pareto Testing over repeated calibration draws from populations with known risks.

Per-exit vectors: the population of :mod:`tests.validity.pareto_population` gives the exact
risk of ANY threshold vector. Every draw is a fresh i.i.d. calibration set; Pareto Testing
searches vectors on one half and tests on the other; the chosen vector's *true* risks are
compared with the targets. A violation is a draw in which some risk exceeds its epsilon; the
violation count must be consistent with a rate <= delta (one-sided binomial test at level
0.001 per configuration).

* one risk, two risks (a signed gap risk and a consistency risk), an exceedance risk alone
  and beside the mean of the same continuous loss;
* the negative control the issue asks for: "pick the cheapest vector whose risk on all the
  calibration data is below epsilon" (no held-out test) violates in about half the draws,
  and the same check catches it;
* the table API without a natural order (configurations with shuffled risks), and with one
  (multi-risk fixed-sequence testing on all samples); there, a p-value that is too
  optimistic (computed as if there were eight times as many samples) is caught by the same
  check;
* the same seed in every draw (a fixed permutation of i.i.d. files) keeps the guarantee;
* an exceedance risk alone on the scalar grid, with the existing procedures.

About 20 seconds on two cores in all.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import stats

from exitguard.evaluation import selections
from exitguard.risk import bounds
from exitguard.risk.configurations import ThresholdFamily, evaluate_vectors, family_table
from exitguard.risk.exits import default_thresholds
from exitguard.risk.pareto import VectorSearch, pareto_test, pareto_test_table
from exitguard.risk.tail import exceedance_per_exit
from tests.validity.pareto_population import EXIT_COST, draw, true_risks

DELTA = 0.1
TOLERANCE = 0.1  # of the exceedance risk P(continuous loss > 0.1)
# Validity does not depend on how well the search does: a light one keeps the checks fast.
LIGHT = VectorSearch(
    levels=12,
    restarts=0,
    multipliers=4,
    sweeps=1,
    greedy=False,
    scalar_levels=30,
    families=(ThresholdFamily(),),
)


def check(violations: int, draws: int, label: str) -> float:
    p = stats.binomtest(violations, draws, DELTA, alternative="greater").pvalue
    assert p > 1e-3, f"{label}: {violations}/{draws} violations (p = {p:.2g})"
    return violations / draws


def per_exit(data: dict[str, np.ndarray], risk: str) -> np.ndarray:
    if risk == "exceedance":
        return exceedance_per_exit(data["continuous"], TOLERANCE)
    return data[risk]


def simulate(risks, targets, *, n, draws, seed, procedure="ucb-wsr"):
    """True risks (draws, R) of Pareto Testing's choice and of the naive choice."""
    rng = np.random.default_rng(seed)
    eps = np.array(targets)
    chosen, naive = [], []
    for _ in range(draws):  # one calibration set per draw, each with its own search
        data = draw(n, rng)
        losses = np.stack([per_exit(data, r) for r in risks])  # (R, n, 4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nothing certified in a few draws
            selection = pareto_test(
                data["conf"],
                losses,
                target_risks=eps,
                exit_cost=EXIT_COST,
                procedure=procedure,
                search=LIGHT,
                seed=int(rng.integers(2**53)),
            )
        front = np.array(selection.front)
        chosen.append(front[selection.index])
        # Naive: the cheapest vector of the front whose risks on ALL the data are <= eps.
        table = evaluate_vectors(data["conf"], losses, front, exit_cost=EXIT_COST)
        ok = np.flatnonzero(np.all(table.risks() <= eps[:, None], axis=0))
        naive.append(front[ok[np.argmin(table.mean_cost()[ok])]])
    truth = true_risks(np.array(chosen), tolerance=TOLERANCE)
    naive_truth = true_risks(np.array(naive), tolerance=TOLERANCE)
    return (
        np.stack([truth[r] for r in risks], axis=1),
        np.stack([naive_truth[r] for r in risks], axis=1),
    )


def violations(risks: np.ndarray, targets) -> int:
    return int(np.sum(np.any(risks > np.array(targets) + 1e-12, axis=1)))


@pytest.fixture(scope="module")
def one_risk():
    return simulate(["consistency"], [0.05], n=300, draws=200, seed=31)


def test_pareto_testing_one_risk(one_risk):
    chosen, _ = one_risk
    check(violations(chosen, [0.05]), len(chosen), "one risk")


def test_naive_best_vector_violates_and_the_check_catches_it(one_risk):
    _, naive = one_risk
    count = violations(naive, [0.05])
    assert count > 0.3 * len(naive)  # about half the draws
    with pytest.raises(AssertionError, match="violations"):
        check(count, len(naive), "naive")


def test_pareto_testing_two_risks():
    targets = [0.03, 0.06]
    chosen, _ = simulate(["gap", "consistency"], targets, n=300, draws=150, seed=32)
    check(violations(chosen, targets), len(chosen), "two risks")


def test_pareto_testing_exceedance_alone_and_beside_the_mean():
    targets = [0.05, 0.15]
    chosen, _ = simulate(
        ["continuous", "exceedance"], targets, n=300, draws=120, seed=33, procedure="ltt"
    )
    check(violations(chosen, targets), len(chosen), "mean and exceedance")
    alone, naive = simulate(["exceedance"], [0.15], n=300, draws=120, seed=34)
    check(violations(alone, [0.15]), len(alone), "exceedance alone")
    with pytest.raises(AssertionError, match="violations"):
        check(violations(naive, [0.15]), len(naive), "naive exceedance")


# ----------------------------------------------------------------------- the table API


def shuffled_population(rng: np.random.Generator):
    """True risks (2, K) of configurations in no natural order, and their costs (K,).

    The first risk rises to the target 0.1, then sits on a plateau just above it (the hardest
    case: a violation needs one barely-bad configuration to pass), then rises further; the
    second risk stays below its target. Cost falls as the first risk rises.
    """
    first = np.concatenate(
        [np.linspace(0.0, 0.1, 20), np.full(10, 0.102), np.linspace(0.11, 0.2, 10)]
    )
    second = 0.5 * first + 0.02
    rank = rng.permutation(len(first))
    return np.stack([first, second])[:, rank], (1.0 - 2.0 * first)[rank]


def table_draw(risks: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Losses (R, K + 1, n): row 0 the full model, each risk a 0-1 loss with the given mean."""
    u = rng.random((risks.shape[0], 1, n))
    losses = (u < risks[:, :, None]).astype(float)
    return np.concatenate([np.zeros((risks.shape[0], 1, n)), losses], axis=1)


def table_violations(
    order: str, *, draws: int, seed: int, procedure: str = "ltt", fixed_seed: int | None = None
) -> int:
    rng = np.random.default_rng(seed)
    risks, cost = shuffled_population(np.random.default_rng(0))
    if order == "natural":  # rows sorted by their first risk: a natural order
        rank = np.argsort(risks[0], kind="stable")
        risks, cost = risks[:, rank], cost[rank]
    targets = np.array([0.1, 0.1])
    count = 0
    for _ in range(draws):  # no search: every draw is a few milliseconds
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            selection = pareto_test_table(
                table_draw(risks, 1000, rng),
                target_risks=targets,
                cost=np.concatenate([[2.0], cost]),
                order=order,
                procedure=procedure,
                seed=int(rng.integers(2**53)) if fixed_seed is None else fixed_seed,
            )
        if selection.row > 0:
            count += bool(np.any(risks[:, selection.row - 1] > targets))
    return count


@pytest.mark.parametrize("order", ["pareto", "natural"])
def test_table_api(order):
    check(table_violations(order, draws=300, seed=35), 300, f"table, {order} order")


@pytest.mark.parametrize("fixed_seed", [0, 1])
def test_a_fixed_seed_keeps_the_guarantee_on_exchangeable_files(fixed_seed):
    """The same seed in every draw: the split is a fixed permutation of i.i.d. files."""
    count = table_violations(
        "pareto", draws=300, seed=38, procedure="ucb-wsr", fixed_seed=fixed_seed
    )
    check(count, 300, f"table, seed {fixed_seed} in every draw")


def test_the_check_catches_a_too_optimistic_p_value(monkeypatch):
    def too_optimistic(losses, alpha, *, loss_bound, **kwargs):
        # The Hoeffding-Bentkus p-value of eight times as many samples with the same mean: a
        # bound about 2.8 times too narrow (test_validity.py shrinks Hoeffding's 8 times).
        mean = bounds.to_unit_interval(losses, loss_bound).mean(axis=-1)
        n = 8 * losses.shape[-1]
        return bounds.hoeffding_bentkus_p_value(mean, np.asarray(alpha) / loss_bound, n=n)

    monkeypatch.setattr(bounds, "p_values", too_optimistic)
    with pytest.raises(AssertionError, match="violations"):
        check(table_violations("natural", draws=600, seed=37), 600, "too optimistic")


# ---------------------------------------------------- exceedance alone on the scalar grid


@pytest.mark.parametrize("procedure", ["ucb-binomial", "ucb-wsr", "ltt"])
def test_exceedance_risk_with_the_scalar_procedures(procedure):
    rng = np.random.default_rng(36)
    grid = default_thresholds(0.02)
    family = ThresholdFamily()
    truth = true_risks(family.vectors(grid, 4), tolerance=TOLERANCE)["exceedance"]  # (K,)
    tables = []
    for _ in range(300):  # tables of fresh calibration sets
        data = draw(300, rng)
        tail = exceedance_per_exit(data["continuous"], TOLERANCE)
        tables.append(family_table(data["conf"], tail, family=family, lambdas=grid).losses[0])
    index, _ = selections(
        np.stack(tables),
        np.array([0.1]),
        procedure=procedure,
        delta=DELTA,
        loss_bound=1.0,
        order_seeds=rng.integers(0, 2**53, size=300),
    )
    check(int(np.sum(truth[index[:, 0]] > 0.1)), 300, f"exceedance, {procedure}")
