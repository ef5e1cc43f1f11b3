"""Corruptions, audited inference and the drift demo on a tiny configuration."""

import html
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from exitguard import calibrate  # noqa: E402
from exitguard.nn import collect  # noqa: E402
from exitguard.nn.audit import audited_infer  # noqa: E402
from exitguard.risk.exits import exit_index  # noqa: E402
from exitguard.tasks.drift.corrupt import CORRUPTIONS, corrupt  # noqa: E402


@pytest.fixture
def images():
    return torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corruptions(images, kind):
    same = corrupt(images, kind, 0.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(same, images, atol=1e-6, rtol=0) if kind != "rotation" else None
    a = corrupt(images, kind, 0.7, generator=torch.Generator().manual_seed(1))
    b = corrupt(images, kind, 0.7, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == images.shape
    assert a.min() >= 0 and a.max() <= 1
    assert (a - images).abs().mean() > 0.02  # it does something
    weak = corrupt(images, kind, 0.2, generator=torch.Generator().manual_seed(1))
    assert (weak - images).abs().mean() < (a - images).abs().mean()  # severity grows
    with pytest.raises(ValueError, match=r"`severity` must lie in \[0, 1\]"):
        corrupt(images, kind, 1.5, generator=torch.Generator())


def test_rotation_by_a_quarter_turn_moves_a_corner():
    image = torch.zeros(1, 1, 9, 9)
    image[0, 0, 4, 7] = 1.0  # right of the centre
    import exitguard.tasks.drift.corrupt as module

    old = module.MAX_ROTATION_DEGREES
    module.MAX_ROTATION_DEGREES = 90.0
    try:
        turned = corrupt(image, "rotation", 1.0, generator=torch.Generator().manual_seed(0))
    finally:
        module.MAX_ROTATION_DEGREES = old
    row, col = divmod(int(turned.flatten().argmax()), 9)
    assert (row, col) in ((1, 4), (7, 4))  # above or below the centre
    with pytest.raises(ValueError, match="`kind` must be one of"):
        corrupt(image, "snow", 0.5, generator=torch.Generator())


@pytest.fixture(scope="module")
def cache(model_cache):
    return str(model_cache)  # the main job's tiny classifier, trained once per session


@pytest.fixture(scope="module")
def trained(cache):
    from exitguard.tasks import classification

    return classification.prepare(
        classification.DemoConfig(cache_dir=cache, epochs=2, progress=False, quick=True),
        log=lambda _: None,
    )


def crc_policy(trained, start: int, *, labelled: bool = False, **options):
    """A CRC policy at ε = 0.2 calibrated on the held-out outputs from ``start`` on (with
    their labels when ``labelled``), bound to the network."""
    labels = trained.heldout.labels[start:] if labelled else None
    policy = calibrate(
        trained.outputs.probs[start:], labels, target_risk=0.2, procedure="crc", **options
    )
    return trained.network.bind_policy(policy)


def test_audited_inference_scores_the_policy_against_the_full_model(trained):
    network = trained.network
    images = torch.from_numpy(trained.heldout.images[:300])
    policy = crc_policy(trained, 300, risk="prediction_consistency")
    audited = audited_infer(
        network, images, policy, audit=0.5, rng=3, exit_flops=trained.exit_flops
    )
    again = audited_infer(network, images, policy, audit=0.5, rng=3, exit_flops=trained.exit_flops)
    np.testing.assert_array_equal(audited.audited, again.audited)  # seeded coin flips
    assert 0.35 < audited.audited.mean() < 0.65
    # Oracle: the exit rule on a full pass, and disagreement with the last exit.
    every = collect(network, images[torch.from_numpy(np.flatnonzero(audited.audited))])
    exits = exit_index(every.confidences, policy.threshold)
    np.testing.assert_array_equal(audited.audited_exits, exits)
    predictions = every.probs.argmax(-1)
    expected = (predictions[np.arange(len(exits)), exits] != predictions[:, -1]).astype(float)
    np.testing.assert_array_equal(audited.losses, expected)
    np.testing.assert_allclose(audited.exit_probs, every.probs, atol=1e-6)
    assert audited.audit_flops == pytest.approx(audited.audited.sum() * trained.exit_flops[-1])
    none = audited_infer(network, images, policy, audit=0.0, rng=0, exit_flops=trained.exit_flops)
    assert none.audited.sum() == 0 and none.losses.size == 0 and none.overhead == 0
    with pytest.raises(ValueError, match="`audit` must be a probability"):
        audited_infer(network, images, policy, audit=1.5, rng=0)
    with pytest.raises(ValueError, match="`rng` must be"):
        audited_infer(network, images, policy, audit=0.1, rng=None)
    gap = crc_policy(trained, 300, labelled=True)
    labelled = audited_infer(network, images, gap, audit=0.5, rng=3, exit_flops=trained.exit_flops)
    assert labelled.losses is None  # gap risks wait for labels
    labels = trained.heldout.labels[:300][labelled.audited]
    losses = labelled.losses_with_labels(labels)
    truth = every.labels if every.labels is not None else labels
    wrong = (predictions != labels[:, None]).astype(float)
    exits_gap = labelled.audited_exits
    np.testing.assert_array_equal(
        losses, wrong[np.arange(len(exits_gap)), exits_gap] - wrong[:, -1]
    )
    assert truth is not None


def tiny_config(cache, tmp_path, **changes):
    from exitguard.tasks.drift.demo import DemoConfig

    values = {
        "out": str(tmp_path / "report"),
        "cache_dir": cache,
        "epochs": 2,
        "progress": False,
        "quick": True,  # the same (quick) classifier as the fixture's
        "days": 8,
        "per_day": 150,
        "clean_days": 3,
        "ramp_days": 1,
        "audit": 0.5,
        "recalibration_window": 60,
        "target_risk": 0.15,
    }
    values.update(changes)
    return DemoConfig(**values)


def test_the_monitor_catches_a_policy_that_breaks_its_promise(trained, cache, tmp_path):
    """A policy that exits everything at the first exit, passed off as certified at 0.05."""
    import dataclasses

    from exitguard.policy import guarantee_text
    from exitguard.report.drift import render_drift_html
    from exitguard.tasks.drift.demo import prepare, serve

    config = tiny_config(cache, tmp_path, target_risk=0.05)
    prepared = prepare(config, log=lambda _: None)
    overconfident = dataclasses.replace(
        prepared.policy,
        threshold=0.0,
        index=prepared.policy.index or 5,
        certified=True,
        upper_bound=0.01,
        target_risk=0.05,
        guarantee=guarantee_text("ucb-wsr", 0.05, config.delta),
    )
    served = serve(dataclasses.replace(prepared, policy=overconfident), config)
    days = served["days"]
    assert days[0]["risk_original"] > 0.15  # the promise is broken from the start
    events = served["events"]
    assert events and events[0]["event"] == "alarm"
    alarm_day = events[0]["day"]
    after = days[alarm_day + 1]
    assert after["served"] == "full model" and after["risk_served"] == 0.0
    assert after["flops_saved"] == 0.0
    recalibrated = [e for e in events if e["event"] == "recalibrated"]
    if recalibrated:  # a certified replacement must keep its promise on the stream
        later = [d for d in days if d["day"] > recalibrated[0]["day"]]
        assert all(d["risk_served"] < 0.05 + 3 * math.sqrt(0.05 / config.per_day) for d in later)
    segment = served["segments"][0]
    assert len(segment["log10_wealth"]) == segment["audits"]
    assert max(segment["log10_wealth"]) >= math.log10(1 / 0.05) - 1e-9 or max(
        segment["log10_detector"]
    ) >= math.log10(config.arl)
    results = {
        "title": "t",
        "summary": ["s"],
        "settings": dataclasses.asdict(config),
        "recalibration_window": served["window"],
        "samples_needed": served["needed"],
        **served,
    }
    assert "<td>full model</td>" in render_drift_html(results)


def test_drift_demo_end_to_end(cache, tmp_path):
    from exitguard.tasks.drift.demo import run_demo
    from tests.report_checks import check_demo_report, earlier_report

    earlier_report(tmp_path / "report")
    results = run_demo(tiny_config(cache, tmp_path), log=lambda _: None, stream_defaults=False)
    assert len(results.days) == 8 and len(results.summary) == 5
    assert [day.day for day in results.days] == list(range(8))  # days counted from 0
    page = check_demo_report(tmp_path / "report", results, data_files=["policy.json"])
    for name in ("drift_risk.png", "drift_monitor.png", "drift_saving.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    assert all(html.escape(line, quote=True) in page for line in results.summary)


def test_infer_with_an_audit_share_and_labels_that_arrive_later(trained):
    network = trained.network
    images = torch.from_numpy(trained.heldout.images[:200])
    policy = crc_policy(trained, 200, labelled=True)
    ids = np.arange(1000, 1200)  # e.g. request ids
    audited = network.infer(images, policy, audit=0.4, rng=7, sample_ids=ids)
    plain = network.infer(images, policy)
    assert torch.equal(audited.exits, plain.exits)  # served outputs pass through
    assert torch.equal(audited.predictions, plain.predictions)
    np.testing.assert_array_equal(audited.sample_ids, ids[audited.audited])
    labels = dict(zip(ids.tolist(), trained.heldout.labels[:200].tolist(), strict=True))
    late = dict(reversed(list(labels.items())))  # labels arrive in another order
    by_id = audited.losses_with_labels(late)
    in_order = audited.losses_with_labels(trained.heldout.labels[:200][audited.audited])
    np.testing.assert_array_equal(by_id, in_order)
    with pytest.raises(ValueError, match="has no label for 1 audited sample"):
        audited.losses_with_labels({k: v for k, v in labels.items() if k != audited.sample_ids[0]})
    with pytest.raises(ValueError, match=r"`sample_ids` must have shape \(200,\)"):
        network.infer(images, policy, audit=0.4, rng=7, sample_ids=ids[:5])
