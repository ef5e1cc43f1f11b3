"""Validity of every mechanism's certification over repeated calibration/test splits.

For each mechanism a population of 3000 samples is tabulated from small models with spread-out
decisions (labels: the reference model's predictions with a fifth replaced at random, so the gap
risk is not trivial). The target risk is
put just below the population risk of one configuration, so that picking it is a violation
and a naive choice does so often (the check can fail). Over 200 random splits with n = 100:

* UCB-WSR and LTT: the population violation rate is consistent with a rate <= delta
  (one-sided binomial test, level 0.001);
* CRC: the mean population risk of the selected configuration is <= epsilon within
  Monte-Carlo error;
* naive: violates far more often than delta (the harness has power).

The budget risk curve of anytime prediction is checked the same way: all bounds hold at once
in at least 1 - delta of the calibration draws.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

torch = pytest.importorskip("torch")

from exitguard.nn import AnytimeNetwork  # noqa: E402
from exitguard.tasks.mechanisms.collect import (  # noqa: E402
    anytime_table,
    cascade_table,
    halting_table,
    skip_thresholds,
    skipping_table,
)
from exitguard.tasks.mechanisms.tables import budget_risk_curve, evaluate_table  # noqa: E402
from tests.mechanisms.conftest import (  # noqa: E402
    cascade,
    classifier,
    halting,
    images,
    one_thread,
    skip_network,
)

DELTA = 0.1
N_POPULATION = 3000
TRIALS = 200
N_CAL = 100


def _noisy_labels(reference: np.ndarray) -> np.ndarray:
    """A reference model's predictions with a fifth replaced at random."""
    rng = np.random.default_rng(7)
    labels = reference.copy()
    flip = rng.random(len(labels)) < 0.2
    labels[flip] = rng.integers(0, 10, int(flip.sum()))
    return labels


@pytest.fixture(scope="module")
def population():
    with one_thread():
        x = images(N_POPULATION, seed=3)
        network = classifier()
        with torch.inference_mode():
            probs = network(x).softmax(dim=2).double().numpy()
        labels = _noisy_labels(probs[:, -1].argmax(axis=1))
        anytime = AnytimeNetwork(network, x)
        model = halting()
        skip = skip_network()
        with torch.inference_mode():
            skip_labels = _noisy_labels(skip(x).argmax(dim=1).numpy())
        chain = cascade()
        tables = {
            "cascade": cascade_table(chain, x, labels, flops=chain.count_flops(x)),
            "learned halting": halting_table(model, x, labels, flops=model.count_flops(x)),
            "anytime": anytime_table(anytime, probs, labels),
            "layer skipping": skipping_table(
                skip,
                x,
                skip_labels,
                thresholds=skip_thresholds(skip, images(500, seed=9), count=20),
                flops=skip.count_flops(x),
            ),
        }
        yield tables, probs, labels, anytime


def _target(population_risk: np.ndarray) -> float:
    """Just below the risk of the configuration whose risk is closest to 0.08."""
    candidates = np.flatnonzero((population_risk > 0.03) & (population_risk < 0.95))
    assert candidates.size, f"no configuration with a moderate risk: {population_risk}"
    row = candidates[np.argmin(np.abs(population_risk[candidates] - 0.08))]
    return round(float(population_risk[row]) * 0.97, 6)


@pytest.mark.parametrize("risk", ["prediction_gap", "prediction_consistency"])
@pytest.mark.parametrize("mechanism", ["cascade", "learned halting", "anytime", "layer skipping"])
def test_certified_configurations_keep_their_promise(population, mechanism, risk):
    tables = population[0]
    table = tables[mechanism]
    eps = _target(table.loss(risk).mean(axis=1))
    evaluation = evaluate_table(
        table,
        risk=risk,
        procedures=("naive", "crc", "ucb-wsr", "ltt"),
        target_risks=(eps,),
        delta=DELTA,
        n_cal=N_CAL,
        trials=TRIALS,
        seed=11,
        return_selections=True,
    )
    population_risk = table.loss(risk).mean(axis=1)  # (K,) the risk on all samples
    for procedure in ("ucb-wsr", "ltt"):
        row = evaluation.row(procedure, eps)
        assert row.violation_p_value > 1e-3, (
            f"{procedure} on {mechanism}: population violation rate "
            f"{row.population_violation_rate:.3f} (p = {row.violation_p_value:.2g})"
        )
    crc = population_risk[evaluation.selected_rows("crc")[:, 0]]  # (trials,)
    error = crc.std(ddof=1) / math.sqrt(TRIALS)
    assert crc.mean() <= eps + 3 * error, f"crc on {mechanism}: mean risk {crc.mean():.4f} > {eps}"
    naive = evaluation.row("naive", eps)
    violations = round(naive.population_violation_rate * TRIALS)
    p_naive = stats.binomtest(violations, TRIALS, DELTA, alternative="greater").pvalue
    assert p_naive < 1e-3, f"naive on {mechanism} violates only {violations}/{TRIALS} times"


def test_the_budget_risk_curve_covers_every_budget_at_once(population):
    _, probs, labels, anytime = population
    budgets = anytime.budget_cost()
    full = probs[:, -1].argmax(-1)
    true_risk = np.array([(probs[:, e].argmax(-1) != full).mean() for e in range(probs.shape[1])])
    rng = np.random.default_rng(5)
    misses = 0
    draws = 300
    for _ in range(draws):  # independent calibration sets; each curve is one vectorised call
        sample = rng.choice(len(labels), N_CAL, replace=False)
        curve = budget_risk_curve(
            probs[sample],
            labels[sample],
            risk="prediction_consistency",
            budget_cost=budgets,
            delta=DELTA,
            bound="hb",
        )
        misses += bool(np.any(true_risk > np.asarray(curve.upper_bound) + 1e-12))
    assert stats.binomtest(misses, draws, DELTA, alternative="greater").pvalue > 1e-3
    assert true_risk[0] > 0.05, "the first exit must have a real risk for the check to bite"
