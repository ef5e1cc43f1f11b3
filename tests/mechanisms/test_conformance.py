"""One conformance harness over the four mechanisms (cascade, learned halting, anytime budgets,
layer skipping), in the spirit of tests/test_conformance.py:

* real runs (compacted batches, blocks run on subsets) equal simulated runs (every step on
  every sample), decisions exactly and outputs to float precision, at batch 48 and batch 1,
  for configurations that use the whole family;
* outputs come back in batch order (a permuted batch gives permuted outputs);
* the full model's configuration is the full model's own output;
* the FLOPs of a real run of one sample, measured with torch's counter, equal the cost the
  mechanism's table charges for it.

The harness itself is checked against broken variants (an out-of-order scatter).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from exitguard.nn import AnytimeNetwork  # noqa: E402
from exitguard.nn.flops import flop_counter  # noqa: E402
from tests.mechanisms.conftest import (  # noqa: E402
    cascade,
    classifier,
    gap_midpoints,
    halting,
    images,
    one_thread,
    skip_network,
)


@dataclasses.dataclass
class Case:
    run: Callable[[Any, Any], Any]
    simulate: Callable[[Any, Any], Any]
    decisions: Callable[[Any], Any]
    full: float
    values: list[float]
    full_output: Callable[[Any], Any]
    expected_flops: Callable[[Any, float, Any], int]  # (sample, value, result) -> FLOPs


def exit_rule_case(model, x, full_output: Callable[[Any], Any]) -> Case:
    """A module that applies the exit rule to every step's confidence (cascade, halting)."""
    _, conf = model.exit_confidences(x)
    flops = model.count_flops(x)
    return Case(
        run=model.infer,
        simulate=model.simulate,
        decisions=lambda r: r.exits,
        full=math.inf,
        values=gap_midpoints(conf[:, :-1].numpy()),
        full_output=full_output,
        expected_flops=lambda s, v, r: flops.full if math.isinf(v) else flops.to_exit[r.exits[0]],
    )


def cascade_case(x) -> Case:
    model = cascade()
    return exit_rule_case(model, x, full_output=model.models[-1])


def halting_case(x) -> Case:
    model = halting()
    return exit_rule_case(model, x, full_output=lambda x: model.network(x)[:, -1])


def anytime_case(x) -> Case:
    network = classifier()
    model = AnytimeNetwork(network, x)
    cost = model.budget_cost()
    values = sorted({*cost.tolist(), *((cost[1:] + cost[:-1]) / 2).tolist(), cost[-1] * 2})
    return Case(
        run=lambda x, v: model.infer(x, budget=v),
        simulate=lambda x, v: model.simulate(x, budget=v),
        decisions=lambda r: r.exits,
        full=float(cost[-1]),
        values=values,
        full_output=lambda x: network(x)[:, -1],
        expected_flops=lambda s, v, r: cost[r.exits[0]],
    )


def skipping_case(x) -> Case:
    model = skip_network()
    flops = model.count_flops(x)
    return Case(
        run=model.infer,
        simulate=model.simulate,
        decisions=lambda r: r.ran,
        full=0.0,
        values=[0.0, *gap_midpoints(model.gate_scores(x).numpy())],
        full_output=model,
        expected_flops=lambda s, v, r: flops.cost(r.ran.numpy(), gates_run=v > 0)[0],
    )


CASES = {
    "cascade": cascade_case,
    "learned halting": halting_case,
    "anytime": anytime_case,
    "layer skipping": skipping_case,
}


@pytest.fixture(params=list(CASES), scope="module")
def case(request):
    with one_thread():
        x = images(48)
        yield CASES[request.param](x), x


def check_real_equals_simulated(case: Case, x) -> set:
    """Assert real = simulated for every value on batch ``x`` and sample by sample."""
    patterns = set()
    for value in case.values:
        real, simulated = case.run(x, value), case.simulate(x, value)
        np.testing.assert_array_equal(case.decisions(real), case.decisions(simulated))
        torch.testing.assert_close(real.logits, simulated.logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(real.predictions, simulated.predictions)
        for index in (0, 7, len(x) - 1):  # batch 1
            alone = case.run(x[index : index + 1], value)
            np.testing.assert_array_equal(
                case.decisions(alone)[0], case.decisions(simulated)[index]
            )
            torch.testing.assert_close(
                alone.logits[0], simulated.logits[index], rtol=1e-5, atol=1e-5
            )
        patterns.update(tuple(np.atleast_1d(d).tolist()) for d in case.decisions(real).numpy())
    return patterns


def test_real_runs_equal_simulated_runs(case):
    config, x = case
    patterns = check_real_equals_simulated(config, x)
    assert len(patterns) >= 3, f"the configurations barely differ: {sorted(patterns)}"


def test_outputs_come_back_in_batch_order(case):
    config, x = case
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(5))
    for value in config.values:
        forward, permuted = config.run(x, value), config.run(x[order], value)
        np.testing.assert_array_equal(config.decisions(permuted), config.decisions(forward)[order])
        torch.testing.assert_close(permuted.logits, forward.logits[order], rtol=1e-5, atol=1e-5)


def test_the_full_configuration_is_the_full_model(case):
    config, x = case
    result = config.run(x, config.full)
    with torch.inference_mode():
        expected = config.full_output(x)
    torch.testing.assert_close(result.logits, expected, rtol=1e-5, atol=1e-5)


def test_flops_of_real_runs_equal_the_table(case):
    config, x = case
    checked = set()
    for value in [config.full, *config.values]:
        for index in range(0, len(x), 12):
            sample = x[index : index + 1]
            with flop_counter() as counter:
                result = config.run(sample, value)
            assert counter.get_total_flops() == int(config.expected_flops(sample, value, result))
            checked.add(tuple(np.atleast_1d(config.decisions(result)[0].numpy()).tolist()))
    assert len(checked) >= 3, f"too few decisions checked: {sorted(checked)}"


def test_the_harness_detects_an_out_of_order_scatter(monkeypatch):
    """Writing the finished samples at the wrong rows fails the check (cascade, halting)."""
    from exitguard.nn import _compaction

    original = _compaction.RowWriter.write

    def shifted(self, rows, values):
        original(self, torch.roll(rows, 1) if rows.shape[0] < self.n else rows, values)

    x = images(48)
    config = cascade_case(x)
    monkeypatch.setattr(_compaction.RowWriter, "write", shifted)
    with pytest.raises(AssertionError):
        check_real_equals_simulated(config, x)


def test_the_harness_detects_a_skip_network_that_scatters_to_the_wrong_rows():
    from exitguard.nn import SkipNetwork

    class Broken(SkipNetwork):
        """Runs a gated block on the samples that take it, writes them to the first rows."""

        @torch.inference_mode()
        def infer(self, x, threshold):
            h = self.stem(x)
            ran = []
            for index in range(len(self.blocks)):
                if not self.gated[index] or threshold == 0.0:
                    h = self._run_block(index, h)
                    if self.gated[index]:
                        ran.append(torch.ones(len(x), dtype=torch.bool))
                    continue
                take = self.gates[index](h) >= threshold
                ran.append(take)
                rows = take.nonzero()[:, 0]
                if rows.numel():
                    h = h.clone()
                    h[: rows.numel()] = self._run_block(index, h[rows])
            return self._output(self.head(h), ran, threshold, len(x))

    x = images(48)
    config = skipping_case(x)
    good = skip_network()
    gates = [g if gated else None for g, gated in zip(good.gates, good.gated, strict=True)]
    broken = Broken(good.stem, good.blocks, gates, good.head).eval()
    config.run = broken.infer
    with pytest.raises(AssertionError):
        check_real_equals_simulated(config, x)


def test_anytime_per_sample_budgets_compact_the_batch():
    x = images(40)
    network = classifier()
    model = AnytimeNetwork(network, x)
    cost = torch.as_tensor(model.budget_cost())
    budgets = cost[torch.arange(40) % len(cost)] + 1.0  # (B,) every exit, interleaved
    real, simulated = model.infer(x, budget=budgets), model.simulate(x, budget=budgets)
    np.testing.assert_array_equal(real.exits, torch.arange(40) % len(cost))
    np.testing.assert_array_equal(real.exits, simulated.exits)
    torch.testing.assert_close(real.logits, simulated.logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(real.cost.numpy(), cost[real.exits].numpy())


def test_anytime_refine_yields_every_exit_and_stops_when_interrupted():
    x = images(10)
    network = classifier()
    model = AnytimeNetwork(network, x)
    with torch.inference_mode():
        logits = network(x)  # (B, L, C)
    steps = list(model.refine(x))
    assert [s.exit for s in steps] == list(range(network.n_exits))
    for step in steps:
        torch.testing.assert_close(step.logits, logits[:, step.exit], rtol=1e-5, atol=1e-5)
    assert [s.flops for s in steps] == model.flops.to_exit.tolist()
    with flop_counter() as counter:
        for step in model.refine(x[:1]):
            if step.exit == 0:
                break  # an interrupt: nothing after the first stage runs
    assert counter.get_total_flops() == model.flops.to_exit[0]


def test_anytime_budgets_in_milliseconds_follow_the_latency_profile():
    from exitguard.nn import profile_latency

    x = images(16)
    network = classifier()
    profile = profile_latency(network, x, batch_sizes=(1, 16), repeats=2, warmup=1)
    model = AnytimeNetwork(network, x, profile=profile)
    per_batch = model.budget_cost("batch_ms", batch_size=16)
    assert np.all(np.diff(per_batch) > 0)
    np.testing.assert_allclose(model.budget_cost("ms", batch_size=16), per_batch / 16)
    exits = model.exit_for_budget(float(per_batch[1]) * 1.0001, unit="batch_ms", batch_size=16)
    assert int(exits) == 1
    result = model.infer(x, budget=float(model.budget_cost("ms", batch_size=16)[-1]), unit="ms")
    assert (result.exits == network.n_exits - 1).all()
