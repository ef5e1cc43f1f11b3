"""Language-model policies are bound to their model, heads and decoding, and checked on use."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from exitguard import calibrate_table  # noqa: E402
from exitguard.tasks.language.decode import EarlyExitLM  # noqa: E402
from exitguard.tasks.language.heads import ExitHeads, ExitHeadsConfig  # noqa: E402
from exitguard.tasks.language.model import load_model, model_fingerprint  # noqa: E402
from tests.hostile.conftest import assert_refuses_link  # noqa: E402
from tests.language.conftest import make_tiny_llama, save_tiny_model_folder  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """One torch thread for the tiny models here (see tests/conftest.py)."""


def make_heads(model, *, exit_layers=(1, 3), seed=1):
    config = ExitHeadsConfig(exit_layers=exit_layers, hidden_size=32, rank=4, confidence_width=8)
    torch.manual_seed(seed)
    heads = ExitHeads(config, final_norm_weight=model.model.norm.weight)
    with torch.no_grad():
        for parameter in heads.parameters():
            parameter.normal_(0.0, 0.3)
    return heads.eval()


def table_policy():
    """A policy that records no model, as `exitguard calibrate` makes from a table today."""
    return calibrate_table(
        np.zeros((3, 50)), target_risk=0.1, procedure="crc", thresholds=[math.inf, 0.6, 0.0]
    )


def cnn_policy():
    """A policy bound to a vision network (3 exits, an architecture fingerprint, 'margin')."""
    return table_policy().with_model(
        n_exits=3, model_fingerprint="0123456789abcdef", confidence="margin"
    )


PROMPT = [[5, 6, 7, 8]]


def generate(lm, policy, **settings):
    return lm.generate(torch.tensor(PROMPT), max_new_tokens=4, threshold=policy, **settings)


# ----------------------------------------------------------------- fingerprints


def test_the_model_fingerprint_does_not_depend_on_the_folder(tmp_path):
    first = save_tiny_model_folder(tmp_path / "one")
    second = tmp_path / "somewhere" / "else"
    shutil.copytree(first, second)
    assert model_fingerprint(load_model(first)[0]) == model_fingerprint(load_model(second)[0])


def test_the_model_fingerprint_sees_every_layer():
    model = make_tiny_llama()
    before = model_fingerprint(model)
    with torch.no_grad():
        model.model.layers[-1].mlp.down_proj.weight[0, 0] += 1.0  # the last layer only
    assert model_fingerprint(model) != before


def test_damaged_or_mixed_up_head_files_are_refused(tmp_path):
    from exitguard.tasks.language.heads import HeadsFileError

    model = make_tiny_llama()
    make_heads(model, seed=1).save(tmp_path / "one")
    make_heads(model, seed=2).save(tmp_path / "two")
    (tmp_path / "one" / "heads.safetensors").write_bytes(
        (tmp_path / "two" / "heads.safetensors").read_bytes()  # another save's weights
    )
    with pytest.raises(HeadsFileError, match=r"do not match the fingerprint in heads\.json"):
        ExitHeads.load(tmp_path / "one")
    (tmp_path / "two" / "heads.json").write_text("[]")
    with pytest.raises(HeadsFileError, match=r"not an exitguard exit-head file"):
        ExitHeads.load(tmp_path / "two")


# ----------------------------------------------------------------- the API


def test_an_unbound_policy_is_refused_unless_allowed():
    model = make_tiny_llama()
    lm = EarlyExitLM(model, make_heads(model))
    with pytest.raises(ValueError, match=r"does not record the language model.*lm\.bind_policy"):
        generate(lm, table_policy())
    allowed = generate(lm, table_policy(), allow_unbound=True)
    assert torch.equal(allowed.tokens, generate(lm, table_policy().threshold).tokens)


def test_a_vision_networks_policy_is_refused():
    model = make_tiny_llama()
    lm = EarlyExitLM(model, make_heads(model))
    with pytest.raises(ValueError, match=r"another kind of model .* not for a language model"):
        generate(lm, cnn_policy(), confidence="margin")
    with pytest.raises(ValueError, match=r"another kind of model"):
        generate(lm, cnn_policy(), confidence="margin", allow_unbound=True)


def test_a_bound_policy_runs_only_with_its_model_heads_and_decoding():
    model = make_tiny_llama()
    heads = make_heads(model)
    lm = EarlyExitLM(model, heads)
    policy = lm.bind_policy(table_policy(), confidence="softmax", decay=0.5, kv_fill="defer")
    assert policy.n_exits == 3 and policy.confidence == "softmax"
    assert policy.model_fingerprint.startswith("lm1;") and "kv=defer" in policy.model_fingerprint
    settings = {"confidence": "softmax", "decay": 0.5, "kv_fill": "defer"}
    by_value = generate(lm, policy.threshold, **settings)
    assert torch.equal(generate(lm, policy, **settings).tokens, by_value.tokens)

    other_model = make_tiny_llama(seed=7)
    cases = [
        (EarlyExitLM(other_model, heads), settings, r"the model \(the policy's is"),
        (EarlyExitLM(model, make_heads(model, seed=2)), settings, r"the exit heads"),
        (
            EarlyExitLM(model, make_heads(model, exit_layers=(1, 2))),
            settings,
            (
                r"the exit layers \(the policy's are after layers 2, 4, 6; these are after "
                r"layers 2, 3, 6\)"
            ),
        ),
        (lm, {**settings, "decay": 0.0}, r"the threshold decay \(the policy's is 0\.5"),
        (lm, {**settings, "kv_fill": "propagate"}, r"the cache mode kv_fill"),
        (lm, {**settings, "confidence": "learned"}, r"thresholds the confidence 'softmax'"),
    ]
    for other, used, message in cases:  # a loop over the ways a decoding can differ
        with pytest.raises(ValueError, match=message):
            generate(other, policy, **used)
        with pytest.raises(ValueError, match=message):  # the opt-in covers only unbound ones
            generate(other, policy, allow_unbound=True, **used)


def test_a_malformed_language_model_binding_is_refused():
    model = make_tiny_llama()
    lm = EarlyExitLM(model, make_heads(model))
    forged = table_policy().with_model(n_exits=3, model_fingerprint="lm1;model=zz;heads=none")
    with pytest.raises(ValueError, match=r"malformed language-model binding"):
        generate(lm, forged, confidence="learned")


# ----------------------------------------------------------------- the sweep table


def test_the_sweep_table_records_what_a_policy_needs(tmp_path):
    from exitguard.tasks.language.binding import policy_fields_from_table
    from exitguard.tasks.language.sweep import sweep

    model = make_tiny_llama()
    lm = EarlyExitLM(model, make_heads(model))
    table = sweep(
        lm,
        [[5, 6, 7, 8], [9, 10, 11]],
        thresholds=[math.inf, 0.6, 0.0],
        max_new_tokens=3,
        confidence="softmax",
        decay=0.25,
        kv_fill="defer",
        progress=False,
    )
    assert_refuses_link(table.save, tmp_path / "table.npz")
    (tmp_path / "table.npz").unlink()
    path = table.save(tmp_path / "table.npz")
    with np.load(path, allow_pickle=False) as data:
        fields = policy_fields_from_table(data)
        losses = data["losses"]
    expected = lm.binding(decay=0.25, kv_fill="defer").fingerprint()
    assert fields == {"n_exits": 3, "model_fingerprint": expected, "confidence": "softmax"}
    policy = calibrate_table(
        losses, target_risk=0.5, procedure="naive", thresholds=[math.inf, 0.6, 0.0]
    ).with_model(**fields)  # what `exitguard calibrate` does with such a table
    generate(lm, policy, confidence="softmax", decay=0.25, kv_fill="defer")
    with pytest.raises(ValueError, match=r"the threshold decay"):
        generate(lm, policy, confidence="softmax", kv_fill="defer")


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"n_exits": np.int64(0)}, r"`n_exits` must be one positive integer"),
        ({"confidence_name": np.str_("max_softmax")}, r"`confidence_name` must be one of"),
        ({"n_exits": np.int64(4)}, r"does not match the exits recorded"),
        ({"model_fingerprint": np.float64(1.0)}, r"`model_fingerprint` must be one string"),
    ],
)
def test_table_model_fields_are_checked(update, message):
    from exitguard.tasks.language.binding import LMBinding, policy_fields_from_table

    binding = LMBinding.create(
        model="0" * 16, heads="1" * 16, exit_layers=(1, 3, 5), decay=0.0, kv_fill="propagate"
    )
    data = {
        "model_fingerprint": np.str_(binding.fingerprint()),
        "n_exits": np.int64(3),
        "confidence_name": np.str_("learned"),
    }
    assert policy_fields_from_table(data)["n_exits"] == 3
    with pytest.raises(ValueError, match=message):
        policy_fields_from_table({**data, **update})
    with pytest.raises(ValueError, match=r"must hold all of"):
        policy_fields_from_table({"n_exits": np.int64(3)})
    assert policy_fields_from_table({"losses": np.zeros((2, 2))}) == {}


# ----------------------------------------------------------------- the command line


@pytest.fixture
def cli(tmp_path, monkeypatch):
    from exitguard.tasks.language.cli import main

    monkeypatch.setenv("EXITGUARD_CACHE", str(tmp_path / "cache"))
    folder = save_tiny_model_folder(tmp_path / "model")
    model, _ = load_model(folder)
    heads = make_heads(model)
    heads.save(tmp_path / "heads")
    common = ["--model", str(folder), "--heads", str(tmp_path / "heads"), "--quiet"]
    lm = EarlyExitLM(model, ExitHeads.load(tmp_path / "heads"))

    def run(policy, *options):
        path = tmp_path / "policy.json"
        policy.save(path)
        argv = ["lm", "generate", *common, "--policy", str(path), "--prompt", "def f", *options]
        return main([*argv, "--max-new-tokens", "3"])

    return run, lm


def test_generate_refuses_a_vision_networks_policy_in_one_line(cli, capsys):
    run, _ = cli
    assert run(cnn_policy()) == 2
    error = capsys.readouterr().err
    assert "another kind of model" in error and error.count("\n") == 1


def test_generate_takes_the_decoding_from_the_policy(cli, capsys):
    run, lm = cli
    policy = lm.bind_policy(table_policy(), confidence="softmax", decay=0.5, kv_fill="defer")
    assert run(policy) == 0
    assert "confidence softmax" in capsys.readouterr().out
    assert run(policy, "--kv-fill", "propagate") == 2
    assert "--kv-fill propagate contradicts the policy" in capsys.readouterr().err
    assert run(table_policy()) == 2
    assert "--allow-unbound" in capsys.readouterr().err
    assert run(table_policy(), "--allow-unbound") == 0
