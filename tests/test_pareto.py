"""Pareto Testing: oracle values, invariants and argument checks (validity: tests/validity)."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from scipy import stats

from exitguard import calibrate_table
from exitguard.risk import bounds
from exitguard.risk.configurations import ThresholdFamily, evaluate_vectors
from exitguard.risk.exits import default_thresholds
from exitguard.risk.pareto import (
    NothingCertifiedWarning,
    ParetoSelection,
    VectorSearch,
    coordinate_curve,
    fixed_sequence,
    order_front,
    pareto_front,
    pareto_test,
    pareto_test_table,
    search_vectors,
    smooth_losses,
)
from tests.validity.pareto_population import EXIT_COST, draw, true_cost, true_risks

LIGHT = VectorSearch(levels=16, restarts=1, multipliers=6, sweeps=2, scalar_levels=40)


def light_pareto_test(confidences, per_exit_losses, **options) -> ParetoSelection:
    """``pareto_test`` on the population's exit costs, with the light search."""
    return pareto_test(confidences, per_exit_losses, exit_cost=EXIT_COST, search=LIGHT, **options)


def brute_front(points: np.ndarray) -> np.ndarray:
    keep = []
    for i, p in enumerate(points):
        dominated = any(np.all(q <= p) and np.any(q < p) for j, q in enumerate(points) if j != i)
        keep.append(not dominated)
    return np.array(keep)


@pytest.mark.parametrize("columns", [2, 3])
def test_pareto_front_matches_a_brute_force_filter(rng, columns):
    points = np.round(rng.random((120, columns)), 1)  # coarse: ties and exact duplicates
    points[5] = points[6]
    np.testing.assert_array_equal(pareto_front(points), brute_front(points))


def test_coordinate_curve_matches_evaluating_each_vector(rng):
    n, n_exits = 150, 5
    conf = np.round(rng.random((n, n_exits)), 2)
    relative = rng.random((2, n, n_exits))
    relative -= relative[..., -1:]
    exit_cost = np.cumsum(rng.random(n_exits) + 0.5)
    head_cost = rng.random(n_exits) * 0.1
    for _ in range(50):
        vector = np.where(rng.random(n_exits - 1) < 0.3, np.inf, np.round(rng.random(4), 2))
        exit_ = int(rng.integers(n_exits - 1))
        options = np.array([np.inf, 1.0, 0.7, 0.5, vector[exit_], 0.31, 0.0])
        for heads in (None, head_cost):
            risks, cost = coordinate_curve(conf, relative, exit_cost, heads, vector, exit_, options)
            candidates = np.repeat(vector[None], len(options), axis=0)
            candidates[:, exit_] = options
            table = evaluate_vectors(
                conf,
                relative - relative.min(),  # absolute losses >= 0; differences are unchanged
                candidates,
                loss_bounds=2.0,
                exit_cost=exit_cost,
                head_cost=heads,
            )
            np.testing.assert_allclose(risks, table.risks())
            np.testing.assert_allclose(cost, table.mean_cost())


def test_fixed_sequence_by_hand():
    p = np.array([[0.01, 0.02, 0.5, 0.01], [0.03, 0.2, 0.01, 0.01]])
    assert fixed_sequence(p, delta=0.1) == 1  # entry 1 fails on its second risk
    assert fixed_sequence(p, delta=0.25) == 2
    assert fixed_sequence(p, delta=0.6) == 4
    assert fixed_sequence(p[:, :0], delta=0.1) == 0


def test_order_front_by_hand():
    risks = np.array([[0.04, 0.01, 0.0, 0.01], [0.0, 0.0, 0.03, 0.0]])
    cost = np.array([1.0, 3.0, 2.0, 2.5])
    # Margins (risk - eps) / scale: eps (0.05, 0.05), scales (0.1, 0.2).
    order = order_front(risks, cost, target_risks=[0.05, 0.05], scales=[0.1, 0.2])
    # keys: -0.1, -0.25 (ties by cost: 3.0 first), -0.1, -0.25 -> [1, 3, 0 or 2...]
    assert list(order[:2]) == [1, 3]
    assert set(order[2:]) == {0, 2}
    assert order[2] == 2  # equal keys -0.1: the higher cost first


def test_smoothing_by_hand():
    conf = np.array([[0.9, 1.0], [0.8, 1.0], [0.7, 1.0], [0.1, 1.0]])
    relative = np.array([[[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]]])
    np.testing.assert_array_equal(smooth_losses(conf, relative, smoothing=0.0), relative)
    smoothed = smooth_losses(conf, relative, smoothing=0.5)  # h = ceil(0.5 * 2) = 1
    prior = 0.5  # the exit's mean loss, one pseudo-sample
    expected = [(1 + 0 + prior) / 3, (1 + 0 + 0 + prior) / 4, (0 + 0 + 1 + prior) / 4]
    expected.append((0 + 1 + prior) / 3)
    np.testing.assert_allclose(smoothed[0, :, 0], expected)
    np.testing.assert_array_equal(smoothed[0, :, 1], 0.0)


def hb_by_hand(losses: np.ndarray, eps: float) -> float:
    n, mean = len(losses), losses.mean()
    a = min(mean, eps)
    kl = (a * math.log(a / eps) if a > 0 else 0.0) + (1 - a) * math.log((1 - a) / (1 - eps))
    return min(math.exp(-n * kl), math.e * stats.binom.cdf(round(n * mean), n, eps))


def test_natural_order_p_values_are_the_bounds(rng):
    # Two risks, four rows: p-values of every row by hand (HB) and from the WSR process.
    n = 200
    losses = np.zeros((2, 4, n))
    losses[0, 1:] = rng.random((3, n)) < np.array([0.01, 0.03, 0.08])[:, None]
    losses[1, 1:] = rng.random((3, n)) < np.array([0.0, 0.02, 0.02])[:, None]
    selection = pareto_test_table(
        losses, target_risks=[0.06, 0.05], cost=[4, 3, 2, 1], order="natural", procedure="ltt"
    )
    expected = [
        [hb_by_hand(losses[r, k], eps) for r, eps in enumerate((0.06, 0.05))] for k in range(4)
    ]
    np.testing.assert_allclose(selection.front_p_values, expected, rtol=1e-10)
    passing = np.cumprod(np.max(expected, axis=1)[1:] <= 0.1).sum()
    assert selection.n_certified == passing
    assert selection.index == passing  # costs fall along the rows: the end of the run

    wsr = pareto_test_table(
        losses, target_risks=[0.06, 0.05], cost=[4, 3, 2, 1], order="natural", seed=3
    )
    from exitguard.risk.procedures import reading_order

    read = losses[:, :, reading_order(losses.reshape(8, n), np.random.default_rng(3))]
    by_hand = [
        bounds.wsr_p_value(read[r], eps, delta=0.1, loss_bound=1.0)
        for r, eps in enumerate((0.06, 0.05))
    ]
    np.testing.assert_allclose(np.array(wsr.front_p_values).T, by_hand)


def nested_table(rng: np.random.Generator, n: int) -> np.ndarray:
    """A scalar-grid-like table: per-sample monotone 0-1 losses with rising risks."""
    risks = np.concatenate([[0.0], np.linspace(0.0, 0.2, 40)])
    return (rng.random(n)[None, :] < risks[:, None]).astype(float)


@pytest.mark.parametrize("procedure", ["ltt", "ucb-wsr", "ucb-hb", "ucb-binomial"])
def test_one_risk_in_natural_order_is_calibrate_table(rng, procedure):
    for trial in range(20):
        table = nested_table(rng, 300)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nothing certified, certified above the target
            policy = calibrate_table(table, target_risk=0.08, procedure=procedure, seed=trial)
            selection = pareto_test_table(
                table,
                target_risks=0.08,
                cost=np.arange(len(table), 0, -1.0),
                order="natural",
                procedure=procedure,
                seed=trial,
            )
        assert selection.row == policy.index
        assert selection.certified == policy.certified


@pytest.fixture(scope="module")
def population_draw() -> dict[str, np.ndarray]:
    return draw(600, np.random.default_rng(7))


@pytest.fixture(scope="module")
def two_risk_selection(population_draw) -> ParetoSelection:
    data = population_draw
    return light_pareto_test(
        data["conf"],
        np.stack([data["gap"], data["consistency"]]),
        target_risks=[0.05, 0.08],
        risk_names=["gap", "consistency"],
        seed=11,
    )


def test_certified_configurations_pass_every_risk(two_risk_selection):
    selection = two_risk_selection
    p_values = np.array(selection.front_p_values)  # (F, R)
    assert selection.certified and selection.n_certified >= 1
    run = p_values[1 : selection.n_certified + 1]
    assert np.all(run.max(axis=1) <= selection.delta)
    if selection.n_certified + 1 < len(p_values):
        assert p_values[selection.n_certified + 1].max() > selection.delta
    assert 1 <= selection.index <= selection.n_certified
    assert selection.p_values == tuple(p_values[selection.index])
    assert max(selection.p_values) <= selection.delta
    assert selection.front[0] == (math.inf,) * 3
    assert selection.thresholds == selection.front[selection.index]
    assert selection.n_opt == 150 and selection.n_test == 450 and selection.n == 600


def test_the_choice_is_the_cheapest_certified(population_draw, two_risk_selection):
    data, selection = population_draw, two_risk_selection
    front = np.array(selection.front)
    table = evaluate_vectors(
        data["conf"], np.stack([data["gap"], data["consistency"]]), front, exit_cost=EXIT_COST
    )
    cost = table.mean_cost()  # cost_estimate="all": every calibration sample
    assert selection.expected_cost == pytest.approx(cost[selection.index])
    assert selection.full_cost == pytest.approx(4.0)
    assert cost[selection.index] == pytest.approx(cost[1 : selection.n_certified + 1].min())


def test_json_round_trip(two_risk_selection):
    text = two_risk_selection.to_json()
    assert "Infinity" not in text and '"never"' in text
    again = ParetoSelection.from_json(text)
    assert again == two_risk_selection
    assert ParetoSelection.from_dict(json.loads(text)).to_dict() == json.loads(text)
    with pytest.raises(ValueError, match="schema"):
        ParetoSelection.from_dict({"schema": "other"})


def test_repr_and_guarantee_are_readable(two_risk_selection):
    text = repr(two_risk_selection)
    assert text.startswith("ParetoSelection(thresholds=(") and "gap=" in text
    assert "consistency" in text and "n_opt=150" in text
    guarantee = two_risk_selection.guarantee
    assert "R[gap] <= 0.05 and R[consistency] <= 0.08" in guarantee and "0.9" in guarantee


def test_a_seed_repeats_the_calibration_and_the_split_is_a_permutation(population_draw):
    data = population_draw
    losses = np.stack([data["gap"], data["consistency"]])[:, :300]
    conf = data["conf"][:300]
    first = light_pareto_test(conf, losses, target_risks=[0.05, 0.08], seed=5)
    assert light_pareto_test(conf, losses, target_risks=[0.05, 0.08], seed=5) == first
    other = light_pareto_test(conf, losses, target_risks=[0.05, 0.08], seed=6)
    assert other.seed == 6 and other.front != first.front  # another split
    fresh = light_pareto_test(conf, losses, target_risks=[0.05, 0.08])
    assert fresh.seed != 5 and fresh.n_opt == first.n_opt == 75
    # The testing part is the last three quarters of the seeded permutation of the samples as given.
    test = np.random.default_rng(5).permutation(300)[75:]
    table = evaluate_vectors(conf[test], losses[:, test], np.array(first.front))
    np.testing.assert_allclose(
        np.array(first.front_p_values).T,
        [
            bounds.wsr_p_value(table.losses[r], eps, delta=0.1, loss_bound=1.0)
            for r, eps in enumerate((0.05, 0.08))
        ],
    )


def test_nothing_certified_is_the_full_model_flagged(population_draw):
    data = population_draw
    with pytest.warns(NothingCertifiedWarning, match="full model"):
        selection = light_pareto_test(
            data["conf"][:40], data["consistency"][:40], target_risks=0.001, seed=0
        )
    assert not selection.certified and selection.index == 0 and selection.is_full_model
    assert selection.thresholds == (math.inf,) * 3
    assert selection.expected_cost == selection.full_cost and selection.relative_saving == 0


def test_an_external_optimisation_set_tests_every_calibration_sample(population_draw):
    data = population_draw
    selection = light_pareto_test(
        data["conf"][:300],
        data["consistency"][:300],
        target_risks=0.08,
        opt_confidences=data["conf"][300:],
        opt_per_exit_losses=data["consistency"][300:],
        seed=2,
    )
    assert selection.opt_source == "external" and selection.opt_fraction == 0.0
    assert selection.n_opt == 300 and selection.n_test == 300
    with pytest.raises(ValueError, match="go together"):
        pareto_test(
            data["conf"],
            data["consistency"],
            target_risks=0.08,
            opt_confidences=data["conf"],
        )


def test_the_table_api_tests_rows_of_the_table(rng):
    n = 400
    risks = rng.permutation(np.linspace(0.0, 0.2, 30))  # no natural order
    losses = np.concatenate([np.zeros((1, n)), rng.random((30, n)) < risks[:, None]])
    cost = np.concatenate([[1.0], 1.0 - risks])  # riskier rows are cheaper
    selection = pareto_test_table(losses, target_risks=0.1, cost=cost, procedure="ltt", seed=4)
    assert selection.front_rows[0] == 0 and selection.opt_source == "split"
    assert selection.row == selection.front_rows[selection.index]
    assert selection.thresholds is None and selection.front is None
    assert selection.certified and risks[selection.row - 1] <= 0.1
    with_vectors = pareto_test_table(
        losses, target_risks=0.1, cost=cost, thresholds=np.arange(31.0)[::-1] / 31, seed=4
    )
    assert with_vectors.thresholds == ((30 - with_vectors.row) / 31,)


def test_the_search_beats_every_scalar_threshold():
    """On a population with a miscalibrated first exit, per-exit vectors save more."""
    data = draw(5000, np.random.default_rng(3))
    relative = data["consistency"][None] - data["consistency"][None, :, -1:]
    candidates = search_vectors(
        data["conf"],
        relative,
        target_risks=np.array([0.05]),
        exit_cost=EXIT_COST,
        settings=VectorSearch(restarts=0, multipliers=8, families=(ThresholdFamily(),)),
        rng=0,
    )
    feasible = true_risks(candidates)["consistency"] <= 0.05
    searched = true_cost(candidates)[feasible].min()
    scalar = ThresholdFamily().vectors(default_thresholds(0.001), 4)
    best_scalar = true_cost(scalar)[true_risks(scalar)["consistency"] <= 0.05].min()
    assert searched < 0.97 * best_scalar  # the best scalar costs 2.49, the best vector 2.29


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"procedure": "ltt-bonferroni"}, "fixed-sequence p-value procedure"),
        ({"procedure": "crc"}, "fixed-sequence p-value procedure"),
        ({"opt_fraction": 0.999}, "empty part"),
        ({"opt_fraction": 0.0}, "opt_fraction"),
        ({"target_risks": [0.1, 0.1]}, "one epsilon or one per risk"),
        ({"risk_names": ["a", "b"]}, "one name per risk"),
        ({"cost_estimate": "opt"}, "cost_estimate"),
        ({"delta": 1.0}, "delta"),
        ({"search": {"levels": 3}}, "VectorSearch"),
    ],
)
def test_bad_arguments_are_refused(population_draw, kwargs, message):
    data = population_draw
    arguments = {"target_risks": 0.05, **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        pareto_test(data["conf"][:100], data["consistency"][:100], **arguments)


def test_bad_tables_are_refused():
    losses = np.zeros((3, 50))
    losses[1:, :5] = 1.0
    with pytest.raises(ValueError, match="row 0 must be loss-free"):
        pareto_test_table(losses[::-1], target_risks=0.1, cost=[3, 2, 1])
    with pytest.raises(ValueError, match="loss_bounds"):
        pareto_test_table(2 * losses, target_risks=0.1, cost=[3, 2, 1])
    with pytest.raises(ValueError, match="cost"):
        pareto_test_table(losses, target_risks=0.1, cost=[3, 2])
    with pytest.raises(ValueError, match="order"):
        pareto_test_table(losses, target_risks=0.1, cost=[3, 2, 1], order="given")
    with pytest.raises(ValueError, match="0-1 losses"):
        pareto_test_table(0.5 * losses, target_risks=0.1, cost=[3, 2, 1], procedure="ucb-binomial")


@pytest.mark.parametrize("seed", [0, 10, 12, 15])
def test_non_binary_losses_are_refused_whatever_the_split(seed):
    # One non-0-1 loss among 60 samples: a check made only on the testing part misses it
    # whenever the split puts that sample into the optimisation part (seeds 10, 12 and 15).
    table = np.zeros((3, 60))
    table[1:, :6] = 1.0
    table[2, 7] = 0.5
    with pytest.raises(ValueError, match=r"risk 0: .*0-1 losses"):
        pareto_test_table(
            table, target_risks=0.1, cost=[3, 2, 1], procedure="ucb-binomial", seed=seed
        )
    conf = np.tile(np.linspace(0.0, 1.0, 60)[:, None], (1, 3))  # (n, L)
    per_exit = np.zeros((60, 3))
    per_exit[7, 0] = 0.5
    with pytest.raises(ValueError, match=r"risk 0: .*0-1 losses"):
        pareto_test(
            conf,
            per_exit,
            target_risks=0.1,
            exit_cost=[1.0, 2.0, 3.0],
            procedure="ucb-binomial",
            search=LIGHT,
            seed=seed,
        )


def test_search_settings_validate_and_round_trip():
    settings = VectorSearch(levels=8, steps=(1, 3), families=(ThresholdFamily("calm", 2.0),))
    assert VectorSearch.from_dict(settings.to_dict()) == settings
    with pytest.raises(ValueError, match="levels"):
        VectorSearch(levels=1)
    with pytest.raises(ValueError, match="steps"):
        VectorSearch(steps=())
    with pytest.raises(ValueError, match="smoothing"):
        VectorSearch(smoothing=-1.0)
    with pytest.raises(TypeError, match="families"):
        VectorSearch(families=("constant",))  # type: ignore[arg-type]
