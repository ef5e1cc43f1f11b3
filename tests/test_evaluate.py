import warnings

import numpy as np
import pytest
from scipy import stats

from exitguard import Evaluation, calibrate_table, evaluate
from exitguard.evaluation import split_indices


@pytest.mark.parametrize("order", ["random", "given"])
def test_vectorised_evaluation_equals_a_loop_of_single_calibrations(calm, order):
    losses, cost = calm["losses"][::4], calm["cost"][::4]  # 25 rows keep the loop quick
    procedures = ["naive", "crc", "crc-marginal", "ucb-wsr", "ucb-hb", "ltt", "ltt-bonferroni"]
    epsilons = [0.03, 0.08]
    result = evaluate(
        losses,
        procedures=procedures,
        target_risks=epsilons,
        n_cal=100,
        trials=6,
        cost=cost,
        seed=7,
        order=order,
        return_selections=True,
    )
    splits = split_indices(losses.shape[1], 100, 6, np.random.default_rng(7))
    for procedure in procedures:
        for e, eps in enumerate(epsilons):
            risks, costs, indices = [], [], []
            for cal, order_seed in zip(splits, result.order_seeds, strict=True):
                test = np.setdiff1d(np.arange(losses.shape[1]), cal)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    policy = calibrate_table(
                        losses[:, cal],
                        target_risk=eps,
                        procedure=procedure,
                        cost=cost,
                        order=order,
                        seed=order_seed,
                    )
                indices.append(policy.index)
                risks.append(losses[policy.index, test].mean())
                costs.append(cost[policy.index])
            row = result.row(procedure, eps)
            np.testing.assert_array_equal(result.selected_rows(procedure)[:, e], indices)
            assert row.mean_index == pytest.approx(np.mean(indices))
            assert row.mean_test_risk == pytest.approx(np.mean(risks))
            assert row.mean_cost == pytest.approx(np.mean(costs))
            assert row.violation_rate == pytest.approx(np.mean(np.array(risks) > eps))


def test_per_sample_cost_is_averaged_over_the_test_split(rng):
    losses = np.zeros((3, 50))
    cost = np.tile(np.arange(50.0), (3, 1)) * [[1], [0.5], [0.25]]
    result = evaluate(
        losses, procedures="naive", target_risks=0.1, n_cal=10, trials=3, cost=cost, seed=1
    )
    split = split_indices(50, 10, 3, np.random.default_rng(1))
    expected = np.mean([np.delete(cost[2], s).mean() for s in split])
    assert result.rows[0].mean_cost == pytest.approx(expected)
    assert result.rows[0].relative_saving == pytest.approx(1 - expected / cost[0].mean())


def test_splits_are_disjoint_and_seeded():
    a = split_indices(30, 10, 5, np.random.default_rng(0))
    b = split_indices(30, 10, 5, np.random.default_rng(0))
    np.testing.assert_array_equal(a, b)
    assert all(len(set(row)) == 10 for row in a)


def test_round_trip(calm, tmp_path):
    result = evaluate(
        calm["losses"], procedures=["crc"], target_risks=[0.05], trials=3, cost=calm["cost"]
    )
    path = result.save(tmp_path / "eval.json")
    assert Evaluation.load(path) == result
    assert "crc" in result.table()


def test_bad_arguments(calm):
    with pytest.raises(ValueError, match="`n_cal` must be below the number of samples"):
        evaluate(calm["losses"], n_cal=2000)
    with pytest.raises(ValueError, match=r"`target_risks` must be a float in \(0, 1\)"):
        evaluate(calm["losses"], target_risks=[0.1, 1.2])
    with pytest.raises(ValueError, match="`procedures` must name at least one"):
        evaluate(calm["losses"], procedures=[])
    with pytest.raises(ValueError, match="`trials` must be a positive integer"):
        evaluate(calm["losses"], trials=0)


def test_calm_guarantees_hold_on_real_data(calm):
    """The paper's language-modelling experiment: n_cal = 100, delta = 0.1, 100 splits."""
    epsilons = [0.03, 0.05, 0.10]
    result = evaluate(
        calm["losses"],
        procedures=["naive", "crc", "crc-marginal", "ucb-wsr", "ltt"],
        target_risks=epsilons,
        delta=0.1,
        n_cal=100,
        trials=100,
        cost=calm["cost"],
        seed=0,
    )
    for eps in epsilons:
        for name in ("ucb-wsr", "ltt"):
            row = result.row(name, eps)
            violations = round(row.population_violation_rate * 100)
            assert stats.binomtest(violations, 100, 0.1, alternative="greater").pvalue > 0.01
            assert row.violation_p_value == pytest.approx(
                stats.binomtest(violations, 100, 0.1, alternative="greater").pvalue
            )
        crc, marginal = result.row("crc", eps), result.row("crc-marginal", eps)
        assert crc.mean_test_risk <= eps and marginal.mean_test_risk <= eps
        # Monotonised losses only ever add loss: the assumption-free CRC exits no earlier.
        assert crc.mean_index <= marginal.mean_index
        # The paper's ordering: CRC (marginal) saves most, then UCB-WSR, then LTT.
        ucb = result.row("ucb-wsr", eps)
        assert marginal.mean_cost <= ucb.mean_cost <= result.row("ltt", eps).mean_cost
    assert result.row("naive", 0.05).violation_rate > 0.3  # naive has no guarantee, and shows it


# The official code's figures on the CALM table (paper.md section 5.4: mean exit layer at
# n_cal = 100 over 100 splits, seed 42; LTT as correct fixed-sequence testing).
PAPER_MEAN_EXIT = {
    "naive": {0.01: 7.98, 0.03: 6.20, 0.05: 5.36, 0.10: 4.29},
    "crc-marginal": {0.01: 10.73, 0.03: 6.78, 0.05: 5.70, 0.10: 4.38},
    "ucb-wsr": {0.01: 14.88, 0.03: 12.10, 0.05: 7.08, 0.10: 4.78},
    "ltt": {0.05: 13.80, 0.10: 7.38},
}


@pytest.mark.parametrize("order", ["given", "random"])
def test_calm_selections_match_the_papers_reference_figures(calm, order):
    """Reading random-order data in a random permutation does not move the selections."""
    result = evaluate(
        calm["losses"],
        procedures=list(PAPER_MEAN_EXIT),
        target_risks=[0.01, 0.03, 0.05, 0.10],
        n_cal=100,
        trials=400,
        cost=calm["cost"],
        seed=1,
        order=order,
    )
    for procedure, figures in PAPER_MEAN_EXIT.items():
        for eps, layers in figures.items():
            # 100 official splits: a standard error of up to ~0.2 layers on their side.
            assert result.row(procedure, eps).mean_cost == pytest.approx(layers, abs=0.4)
