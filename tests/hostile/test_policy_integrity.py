"""Policy files are not trusted blindly: digest, signature, strict schema, model binding."""

import json
import os

import numpy as np
import pytest

from exitguard import PolicyFileError, calibrate_table, load_policy


@pytest.fixture
def policy():
    start = np.random.default_rng(0).integers(1, 40, size=400)
    table = (np.arange(20)[:, None] >= start[None, :]).astype(float)
    grid = np.r_[np.inf, np.linspace(1, 0.05, 19)]
    return calibrate_table(
        table, target_risk=0.1, procedure="ucb-wsr", thresholds=grid, cost=np.arange(20.0), seed=3
    )


def write(tmp_path, data, name="p.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_round_trip_keeps_every_field(policy, tmp_path):
    assert policy.certified and 0 < policy.index
    path = policy.save(tmp_path / "p.json")
    assert load_policy(path) == policy
    assert json.loads(path.read_text())["digest"].startswith("sha256:")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("threshold", 0.01),  # a more aggressive threshold than calibrated
        ("certified", False),
        ("target_risk", 0.5),
        ("upper_bound", 0.0),
        ("n", 100000),
        ("model_fingerprint", "0123456789abcdef"),
    ],
)
def test_any_edit_is_refused_by_the_digest(policy, tmp_path, field, value):
    data = policy.to_dict()
    data[field] = value
    with pytest.raises(PolicyFileError, match="do not match its `digest`"):
        load_policy(write(tmp_path, data))


@pytest.mark.parametrize("field", ["model_fingerprint", "n_exits", "digest", "confidence"])
def test_deleting_a_field_is_refused(policy, tmp_path, field):
    data = policy.to_dict()
    del data[field]
    with pytest.raises(PolicyFileError, match=r"missing policy fields|do not match its `digest`"):
        load_policy(write(tmp_path, data))


def test_duplicate_keys_are_refused(policy, tmp_path):
    text = policy.to_json().replace('"index":', '"threshold": 0.01,\n  "index":', 1)
    path = tmp_path / "dup.json"
    path.write_text(text)
    with pytest.raises(PolicyFileError, match="duplicate key 'threshold'"):
        load_policy(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "is not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"schema": "other"}', "not an exitguard policy"),
        ('{"schema": "exitguard.ExitPolicy", "schema_version": 1}', "`schema_version` must be 2"),
        ('{"a": NaN}', "NaN is not valid JSON"),
        ("[" * 100000 + "]" * 100000, "nested too deeply"),
        ('{"a":' * 20 + "1" + "}" * 20, "nested too deeply"),
    ],
)
def test_malformed_files(tmp_path, content, message):
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(PolicyFileError, match=message):
        load_policy(path)


def test_huge_and_special_files_are_refused_before_reading(tmp_path):
    big = tmp_path / "big.json"
    big.write_text(" " * (2 << 20))
    with pytest.raises(PolicyFileError, match="the limit is 1048576"):
        load_policy(big)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(PolicyFileError, match="is a FIFO, not a regular file"):
        load_policy(fifo)  # would block forever if it were opened for a plain read
    with pytest.raises(PolicyFileError, match="is a folder, not a regular file"):
        load_policy(tmp_path)


def resigned(policy, **changes):
    """A policy dict whose digest was recomputed after an edit: what a careful forger writes."""
    data = {**policy.to_dict(), **changes}
    data.pop("digest")
    import hashlib

    from exitguard.policy import _canonical

    data["digest"] = "sha256:" + hashlib.sha256(_canonical(data)).hexdigest()
    return data


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"procedure": "magic"}, "`procedure`"),
        ({"procedure": "ucb"}, "canonical name"),
        ({"certified": True, "index": 0, "threshold": "never"}, "false at row 0"),
        ({"upper_bound": 0.2}, "needs an `upper_bound` below the target"),
        ({"n": 1}, "`n` .* must be >= 2"),
        ({"index": 0}, 'row 0 is the full model, whose threshold is "never"'),
        ({"threshold": "never"}, "belongs to row 0"),
        ({"threshold": 1.5}, r"must be a number in \[0, 1\]"),
        ({"threshold": "high"}, "`threshold` must be a number"),
        ({"empirical_risk": 7.0}, r"`empirical_risk` must lie in \[-1, 1\]"),
        ({"expected_cost": -1.0}, "`expected_cost` must be >= 0"),
        ({"guarantee": "always safe"}, "`guarantee` does not state"),
        ({"sample_order": None, "order_seed": None}, "`sample_order` must say"),
        ({"certified": False}, "must be the full model"),
        ({"n_exits": 0}, "`n_exits` must be a positive integer"),
        ({"delta": 1.0}, r"`delta` must lie in \(0, 1\)"),
    ],
)
def test_consistent_digest_but_inconsistent_fields(policy, tmp_path, changes, message):
    data = resigned(policy, **changes)
    with pytest.raises(PolicyFileError, match=message):
        load_policy(write(tmp_path, data))


def test_naive_can_never_be_certified(policy, tmp_path):
    from exitguard.policy import guarantee_text

    data = resigned(policy, procedure="naive", guarantee=guarantee_text("naive", 0.1, 0.1))
    with pytest.raises(PolicyFileError, match="`certified` must be false for 'naive'"):
        load_policy(write(tmp_path, data))


def test_a_signed_policy_needs_the_key(policy, tmp_path, monkeypatch):
    monkeypatch.delenv("EXITGUARD_POLICY_KEY", raising=False)
    key = "a shared team secret of 32 bytes"
    path = policy.save(tmp_path / "signed.json", key=key)
    assert json.loads(path.read_text())["signature"].startswith("hmac-sha256:")
    assert load_policy(path, key=key) == policy
    with pytest.raises(PolicyFileError, match="does not match the key"):
        load_policy(path, key="another secret of sixteen+ bytes")
    unsigned = policy.save(tmp_path / "unsigned.json")
    with pytest.raises(PolicyFileError, match="`signature` is missing"):
        load_policy(unsigned, key=key)
    # A forger who recomputes the digest after an edit cannot recompute the signature.
    forged = resigned(policy, threshold=0.01)
    forged["signature"] = json.loads(path.read_text())["signature"]
    with pytest.raises(PolicyFileError, match="does not match the key"):
        load_policy(write(tmp_path, forged), key=key)
    # The key may come from the environment.
    monkeypatch.setenv("EXITGUARD_POLICY_KEY", key)
    assert load_policy(path) == policy
    with pytest.raises(PolicyFileError, match="`signature` is missing"):
        load_policy(unsigned)
    with pytest.raises(ValueError, match="at least 16 bytes"):
        policy.save(tmp_path / "x.json", key="short")


def test_constructing_an_inconsistent_policy_in_code_fails_too(policy):
    import dataclasses

    with pytest.raises(ValueError, match="needs an `upper_bound` below the target"):
        dataclasses.replace(policy, upper_bound=0.5)
    with pytest.raises(ValueError, match="`certified` must be false for 'naive'"):
        dataclasses.replace(policy, procedure="naive", guarantee="x")
