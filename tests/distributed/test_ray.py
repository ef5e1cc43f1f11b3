"""Distributed collection and sweeps on a local Ray: bitwise equality, faults, resume."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ray", reason='needs Ray: pip install "exitguard[ray]"')
torch = pytest.importorskip("torch")

from exitguard.distributed import (  # noqa: E402
    CollectJob,
    DiffusionSweepJob,
    IncompleteRunError,
    ShardFileError,
    ShardStore,
    collect,
    run,
)
from exitguard.nn import collect as collect_here  # noqa: E402
from exitguard.tasks.diffusion.sweep import sweep  # noqa: E402
from tests.distributed.faults import KillingJob  # noqa: E402

pytestmark = pytest.mark.usefixtures("local_ray")

OUTPUT_FIELDS = ("logits", "probs", "confidences", "labels")
SWEEP_FIELDS = ("exits", "images", "cost", "thresholds", "indices")


def assert_same_sweep(got, expected):
    for field in SWEEP_FIELDS:
        assert np.array_equal(getattr(got, field), getattr(expected, field)), field
    assert got.losses.keys() == expected.losses.keys()
    for name in expected.losses:
        assert np.array_equal(got.losses[name], expected.losses[name]), name
    assert (got.seed, got.stream, got.n_exits, got.flops) == (
        expected.seed,
        expected.stream,
        expected.n_exits,
        expected.flops,
    )


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """One torch thread for the tiny models here (see tests/conftest.py)."""


def test_diffusion_sweep_is_bitwise_the_single_process_one_despite_a_killed_worker(
    tiny_denoiser, tmp_path
):
    """Cells of 4 seeds x 2 thresholds; the cells without the full model's row wait for the
    cell that has it and use its images as the loss reference. The worker process dies
    (os._exit) on its first attempt at one such cell; Ray restarts it (reloading the model)
    and retries the cell; the table is still the single-process one, bit for bit."""
    model, grid = tiny_denoiser
    expected = sweep(model, n=10, seed=3, thresholds=grid, batch_size=4, thresholds_per_batch=2)
    job = DiffusionSweepJob(
        model, n=10, seed=3, thresholds=grid, batch_size=4, thresholds_per_batch=2
    )
    assert len(job.items()) == 3 * 3  # 3 blocks of seeds x 3 groups of thresholds
    marker = tmp_path / "attempts"
    report = run(
        KillingJob(job, target="g01-b00001", marker=str(marker)),
        workers=2,
        shards=tmp_path / "shards",
        retries=2,
        log=lambda _: None,
    )
    assert marker.read_text() == "2"  # killed once, then done on the retry
    assert report.complete and len(report.computed) == 9
    got = job.merge(ShardStore(report.folder), seconds=report.seconds)
    assert_same_sweep(got, expected)
    assert np.any(got.table("ssim")[1:] > 0)  # the table is not trivially zero


def test_a_block_that_keeps_failing_is_reported_and_a_rerun_resumes(digits_classifier, tmp_path):
    """A block kills its worker on every attempt: the run reports it by id and keeps the
    other shards (npz, readable without Ray); a rerun computes only that block (and a shard
    found corrupt), and the merged outputs are the single-process ones, bit for bit."""
    network, payload, images, labels = digits_classifier
    settings = dict(labels=labels, batch_size=50, block_size=100)
    job = CollectJob(payload, images, **settings)
    folder = tmp_path / "shards"
    killing = KillingJob(job, target="b00001", marker=str(tmp_path / "attempts"), always=True)
    with pytest.raises(IncompleteRunError) as caught:
        run(killing, workers=2, shards=folder, retries=1, log=lambda _: None)
    report = caught.value.report
    assert set(report.failed) == {"b00001"}
    assert "1 of 3 work items failed: b00001 (samples 100-199): its worker died 2 times" in str(
        caught.value
    )
    assert f"kept in {folder}" in str(caught.value)
    assert (tmp_path / "attempts").read_text() == "2"  # the first try and Ray's one retry
    store = ShardStore(folder)  # partial results kept
    assert [(s.item, s.sample_ids.size) for s in store.shards()] == [
        ("b00000", 100),
        ("b00002", 100),
    ]

    (folder / "b00002.npz").write_bytes(b"truncated")  # a shard damaged on disk
    messages = []
    got = collect(payload, images, **settings, workers=2, shards=folder, log=messages.append)
    assert "resuming from" in messages[-1] and "1 of 3 work items already done" in messages[-1]
    assert any("computing b00002 again" in m for m in messages)
    expected = collect_here(network, torch.from_numpy(images), labels=labels, batch_size=50)
    for field in OUTPUT_FIELDS:
        assert np.array_equal(getattr(got, field), getattr(expected, field)), field
        assert getattr(got, field).dtype == getattr(expected, field).dtype
    assert got.measure == expected.measure
    assert run(job, shards=folder, log=lambda _: None).resumed == ("b00000", "b00001", "b00002")

    other = CollectJob(payload, images, labels=labels, batch_size=25, block_size=100)
    with pytest.raises(ShardFileError, match=r"another run \(it differs in \['batch_size'\]\)"):
        run(other, workers=1, shards=folder, log=lambda _: None)


def test_block_size_must_be_whole_batches(digits_classifier):
    _, payload, images, _ = digits_classifier
    with pytest.raises(ValueError, match=r"`block_size` must be a multiple of `batch_size` \(32\)"):
        CollectJob(payload, images, batch_size=32, block_size=48)


@pytest.mark.slow  # the workers import transformers: about 10 s more
def test_lm_sweep_is_bitwise_the_single_process_one():
    """Prompt batches x groups of 2 thresholds on a tiny random Llama with exit heads; the
    decoder and heads travel as safetensors bytes and are rebuilt from their configs."""
    pytest.importorskip("transformers")
    from exitguard.distributed import lm_sweep
    from exitguard.tasks.language.decode import EarlyExitLM
    from exitguard.tasks.language.heads import ExitHeads, ExitHeadsConfig
    from exitguard.tasks.language.sweep import sweep as sweep_here
    from tests.language.conftest import make_tiny_llama

    model = make_tiny_llama()
    torch.manual_seed(1)
    heads = ExitHeads(
        ExitHeadsConfig(exit_layers=(1, 3), hidden_size=32, rank=4, confidence_width=8),
        final_norm_weight=model.model.norm.weight,
    )
    with torch.no_grad():
        for parameter in heads.parameters():
            parameter.normal_(0.0, 0.3)
    lm = EarlyExitLM(model, heads.eval())
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 9, (11,), generator=generator).tolist()
    prompts = [torch.randint(3, 97, (n,), generator=generator).tolist() for n in lengths]
    references = [torch.randint(3, 97, (6,), generator=generator).tolist() for _ in prompts]
    settings = dict(
        thresholds=[np.inf, 0.9, 0.7, 0.5, 0.3, 0.0],
        references=references,
        max_new_tokens=8,
        batch_size=4,
        thresholds_per_batch=2,
        eos_token_id=2,
    )
    expected = sweep_here(lm, prompts, progress=False, **settings)
    got = lm_sweep(lm, prompts, workers=2, log=lambda _: None, **settings)
    for field in ("consistency", "disagreement", "gap", "quality", "cost", "layers", "tokens"):
        assert np.array_equal(getattr(got, field), getattr(expected, field)), field
    assert got.settings == expected.settings and got.n_layers == expected.n_layers
    assert np.any(got.consistency[1:] > 0)  # early exits change some outputs
    assert got.seconds.shape == (6,) and np.all(got.seconds > 0)


@pytest.mark.slow  # one more run with two models per worker
def test_diffusion_sweep_with_the_feature_loss(tiny_denoiser, digits_classifier):
    """The `features` loss: the classifier travels as a payload and each worker builds its
    FeatureDistance; the table is the single-process one with the same classifier."""
    from exitguard.distributed import diffusion_sweep
    from exitguard.tasks.diffusion.losses import FeatureDistance, ssim_loss

    model, grid = tiny_denoiser
    network, payload, _, _ = digits_classifier
    losses = {"ssim": ssim_loss, "features": FeatureDistance(network)}
    expected = sweep(model, n=6, seed=5, thresholds=grid, batch_size=3, losses=losses)
    got = diffusion_sweep(
        model,
        n=6,
        seed=5,
        thresholds=grid,
        batch_size=3,
        losses=("ssim", "features"),
        features=payload,
        workers=2,
        log=lambda _: None,
    )
    assert_same_sweep(got, expected)
    assert np.any(got.table("features")[1:] > 0)
    with pytest.raises(ValueError, match=r"`features` \(the classifier's ModelPayload\) must be"):
        diffusion_sweep(model, n=6, seed=5, thresholds=grid, losses=("ssim", "features"))
