"""Head training, head files, and the sweep's loss table (tiny random Llama)."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from exitguard.tasks.language.decode import EarlyExitLM  # noqa: E402
from exitguard.tasks.language.heads import (  # noqa: E402
    ExitHeads,
    ExitHeadsConfig,
    HeadsFileError,
    default_exit_layers,
)
from exitguard.tasks.language.sweep import SweepTable, sweep  # noqa: E402
from exitguard.tasks.language.train import train_exit_heads  # noqa: E402
from tests.language.conftest import small_train_config  # noqa: E402

SMALL = small_train_config()


@pytest.fixture(scope="module")
def pydoc_ids():
    from exitguard.data.text import pydoc_topics_text

    # Bytes folded into the tiny vocabulary: a real text, no tokenizer needed.
    return torch.tensor(list(pydoc_topics_text()[:60000].encode()), dtype=torch.long) % 97


def test_training_is_seeded_and_distils(tiny_llama, pydoc_ids):
    def train():
        return train_exit_heads(
            tiny_llama,
            pydoc_ids,
            exit_layers=(1, 3),
            rank=4,
            confidence_width=8,
            config=SMALL,
            progress=False,
        )

    global_state = torch.random.get_rng_state()
    heads_a, report = train()
    assert torch.equal(global_state, torch.random.get_rng_state())  # global RNG untouched
    heads_b, _ = train()
    for (name, a), b in zip(
        heads_a.state_dict().items(), heads_b.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert report.exit_layers == (1, 3)
    assert all(0 <= x <= 1 for x in report.agreement_after + report.confidence_accuracy)
    assert any(u != 0 for u in heads_a.up[0].weight.flatten().tolist())  # adapters moved
    # Distillation: held-out agreement with the last layer does not fall at any exit and rises
    # on average (a few steps on a tiny model).
    before, after = np.array(report.agreement_before), np.array(report.agreement_after)
    assert (after >= before).all() and after.mean() > before.mean(), (before, after)


def test_heads_round_trip_and_corruption(tmp_path, tiny_heads):
    tiny_heads.save(tmp_path / "h", extra={"note": "x"})
    loaded = ExitHeads.load(tmp_path / "h")
    for a, b in zip(tiny_heads.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    (tmp_path / "h" / "heads.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(HeadsFileError, match=r"cannot read .*heads\.safetensors"):
        ExitHeads.load(tmp_path / "h")
    with pytest.raises(HeadsFileError, match="cannot read"):
        ExitHeads.load(tmp_path / "missing")
    (tmp_path / "h" / "heads.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(HeadsFileError, match="not an exitguard exit-head file"):
        ExitHeads.load(tmp_path / "h")


def test_heads_reject_another_model(tmp_path):
    config = ExitHeadsConfig(exit_layers=(1,), hidden_size=8, model_fingerprint="aaaa")
    ExitHeads(config).save(tmp_path)
    with pytest.raises(HeadsFileError, match="trained on model aaaa"):
        ExitHeads.load(tmp_path, model_fingerprint="bbbb")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"exit_layers": (3, 1)}, "`exit_layers` must be a non-empty, strictly increasing"),
        ({"exit_layers": ()}, "`exit_layers` must be a non-empty"),
        ({"exit_layers": (1,), "rank": -1}, "`rank` must be a non-negative integer"),
    ],
)
def test_heads_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExitHeadsConfig(hidden_size=8, **kwargs)


def test_default_exit_layers():
    assert default_exit_layers(30) == (2, 5, 8, 11, 14, 17, 20, 23, 26)
    assert default_exit_layers(6, every=2) == (1, 3)


def test_heads_must_fit_the_model(tiny_llama):
    config = ExitHeadsConfig(exit_layers=(5,), hidden_size=32)
    with pytest.raises(ValueError, match="early exits must sit before the last layer"):
        EarlyExitLM(tiny_llama, ExitHeads(config))


@pytest.fixture
def tiny_table(tiny_llama, tiny_heads):
    lm = EarlyExitLM(tiny_llama, tiny_heads)
    generator = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(3, 97, (int(n),), generator=generator).tolist()
        for n in torch.randint(2, 9, (12,), generator=generator)
    ]
    references = [torch.randint(3, 97, (6,), generator=generator).tolist() for _ in prompts]
    grid = [math.inf, 0.9, 0.7, 0.5, 0.3, 0.0]
    return sweep(
        lm,
        prompts,
        thresholds=grid,
        references=references,
        max_new_tokens=8,
        batch_size=5,
        progress=False,
    )


def test_sweep_table_is_valid_and_row0_loss_free(tiny_table, tmp_path):
    table = tiny_table
    assert table.consistency.shape == (6, 12)
    assert (table.consistency[0] == 0).all()
    assert (table.disagreement[0] == 0).all()
    assert (table.gap[0] == 0).all()
    assert (table.consistency >= 0).all() and (table.consistency <= 1).all()
    assert (np.abs(table.gap) <= 1).all()
    assert (table.layers[0] == 6).all()
    assert table.layers[-1].max() < 6  # the most aggressive threshold really exits early
    assert table.cost[-1].mean() < table.cost[0].mean()
    path = table.save(tmp_path / "table.npz")
    with np.load(path, allow_pickle=False) as data:
        assert data["losses"].shape == (6, 12)
        assert math.isinf(data["thresholds"][0])
        assert np.array_equal(data["losses"], table.consistency)
        assert json.loads(str(data["settings"]))["confidence"] == "learned"
    again = SweepTable.load(path)
    assert np.array_equal(again.gap, table.gap)


def test_sweep_matches_single_generations(tiny_llama, tiny_heads):
    lm = EarlyExitLM(tiny_llama, tiny_heads)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
    table = sweep(
        lm, prompts, thresholds=[math.inf, 0.5], max_new_tokens=6, batch_size=2, progress=False
    )
    for i, prompt in enumerate(prompts):
        out = lm.generate(torch.tensor([prompt]), max_new_tokens=6, threshold=0.5)
        assert table.layers[1, i] == pytest.approx(out.layers[0].double().mean().item())
        assert table.cost[1, i] == pytest.approx(out.cost[0].item())
        full = lm.generate(torch.tensor([prompt]), max_new_tokens=6)
        assert table.cost[0, i] == pytest.approx(full.cost[0].item())  # no deciding cost


def test_sweep_table_calibrates_with_the_core(tiny_table):
    exitguard = pytest.importorskip("exitguard")
    if not hasattr(exitguard, "calibrate_table"):
        pytest.skip("risk core not available")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a 12-sample table may certify nothing
        policy = exitguard.calibrate_table(
            tiny_table.consistency,
            target_risk=0.3,
            delta=0.1,
            procedure="crc",
            cost=tiny_table.cost,
            thresholds=tiny_table.thresholds,
        )
    assert policy.threshold in tiny_table.thresholds.tolist()


def test_sweep_rejects_bad_input(tiny_llama, tiny_heads):
    lm = EarlyExitLM(tiny_llama, tiny_heads)
    with pytest.raises(ValueError, match="`prompts` must be a non-empty list"):
        sweep(lm, [], progress=False)
    with pytest.raises(ValueError, match="`references` must have one entry per prompt"):
        sweep(lm, [[1, 2]], references=[[1], [2]], progress=False)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sweep(lm, [[1, 2]], thresholds=[0.2, 0.5], progress=False)
