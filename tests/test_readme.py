"""Every example of the README runs as written.

Python blocks run one by one, each in a fresh namespace, in a folder that holds the main job's
report (``exitguard-report/classification/``, from a tiny run of the classification demo).
A block can be preceded by an HTML comment naming what it needs:

- ``<!-- readme-test: setup NAME -->``: the names the text says the block assumes (your own
  model and data, the loss table read above, ...), from :data:`SETUPS`;
- ``<!-- readme-test: skip (REASON) -->``: not run (it needs a cluster or a download);
- ``<!-- readme-test: run -->`` before a bash block: its ``exitguard`` commands run for real
  (through ``exitguard.cli.main``) and must succeed.

Every ``exitguard`` command of every other bash block is parsed by the command line parser,
so an option that does not exist or a value it refuses fails the build.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

from exitguard.cli import QUICK_HELP, build_parser, main

README = Path(__file__).resolve().parents[1] / "README.md"
REPORT = Path("exitguard-report") / "classification"
BLOCK = re.compile(
    r"(?:<!-- readme-test: (?P<marker>[^>]*?) -->\n)?```(?P<language>\w+)\n(?P<body>.*?)```",
    re.DOTALL,
)


def blocks(language: str) -> list[tuple[int, str, str]]:
    """(line number, marker, body) of every fenced block of ``language`` in the README."""
    text = README.read_text()
    found = []
    for match in BLOCK.finditer(text):
        if match["language"] == language:
            line = text.count("\n", 0, match.start("body"))
            found.append((line, (match["marker"] or "").strip(), match["body"]))
    return found


def commands(body: str) -> list[list[str]]:
    """The ``exitguard`` commands of a bash block, as argument lists (without the program)."""
    found = []
    for line in body.replace("\\\n", " ").splitlines():
        for part in re.split(r"&&|;", line):
            words = shlex.split(part, comments=True)
            while words and words[0] in ("flock", "sudo"):  # a prefix that runs a command
                words = words[1:] if words[0] == "sudo" else words[2:]
            if words and Path(words[0]).name == "exitguard":
                found.append(words[1:])
    return found


# ------------------------------------------------------------------------------ setups


def _your_model() -> dict:
    """A small trained-ish CNN with modules ``layer1`` .. ``layer3`` and 32x32 RGB data."""
    torch = pytest.importorskip("torch")
    from torch import nn

    torch.manual_seed(0)

    def block(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, 2, 1), nn.BatchNorm2d(c_out), nn.ReLU())

    backbone = nn.Sequential()
    backbone.add_module("layer1", block(3, 8))
    backbone.add_module("layer2", block(8, 16))
    backbone.add_module("layer3", block(16, 16))
    backbone.add_module("pool", nn.AdaptiveAvgPool2d(1))
    backbone.add_module("flatten", nn.Flatten())
    backbone.add_module("fc", nn.Linear(16, 10))
    backbone.eval()
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(400, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (400,), generator=generator)
    return {
        "backbone": backbone,
        "train_images": images[:48],
        "train_labels": labels[:48],
        "calibration_images": images[48:320],
        "calibration_labels": labels[48:320],
        "images": images[320:],
    }


def _your_network() -> dict:
    """Your model with its exits attached (as the example before builds it), and test data."""
    import exitguard
    from exitguard.nn import attach_exits, collect

    names = _your_model()
    network = attach_exits(
        names.pop("backbone"), at=["layer1", "layer2", "layer3"], input_shape=(3, 32, 32)
    )
    return {
        "exitguard": exitguard,
        "collect": collect,
        "network": network.eval(),
        "test_images": names.pop("images"),
        **names,
    }


def _saved_predictions() -> dict:
    """Confidences and predictions of 4 exits (the main job's exits 1 to 4)."""
    import exitguard

    names = {}
    for prefix, file in (("", "exits_calibration.npz"), ("new_", "exits_test.npz")):
        with np.load(REPORT / file) as data:
            probs = data["probs"][:, 1:]  # (n, 4, C)
            names[f"{prefix}confidence"] = probs.max(axis=-1)
            names[f"{prefix}prediction"] = probs.argmax(axis=-1)
            names[f"{prefix}labels" if prefix else "labels"] = data["labels"]
    return {"exitguard": exitguard, **names}


def _loss_table() -> dict:
    import exitguard

    with np.load(REPORT / "table_prediction_gap.npz") as data:
        return {"np": np, "exitguard": exitguard, "data": dict(data)}


def _deployment() -> dict:
    import exitguard
    from exitguard.nn import attach_exits, collect

    names = _your_model()
    network = attach_exits(
        names["backbone"], at=["layer1", "layer2", "layer3"], input_shape=(3, 32, 32)
    )
    outputs = collect(network, names["calibration_images"])
    policy = network.bind_policy(
        exitguard.calibrate(
            outputs.probs, risk="prediction_consistency", target_risk=0.2, procedure="crc"
        )
    )
    return {
        "np": np,
        "network": network,
        "policy": policy,
        "batch": names["images"],
        "rng": np.random.default_rng(0),
        "window": [],
    }


def _your_exit_outputs() -> dict:
    """Your network's calibration outputs with labels and the FLOPs of each exit."""
    from exitguard.nn import count_flops

    names = _your_network()
    network, images = names["network"], names["calibration_images"]
    outputs = names["collect"](network, images, labels=names["calibration_labels"])
    return {
        "exitguard": names["exitguard"],
        "network": network,
        "exit_probs": outputs.probs,
        "labels": outputs.labels,
        "flops_per_exit": count_flops(network, images[:1]).to_exit,
        "x": names["test_images"],
    }


SETUPS = {
    "your-exit-outputs": _your_exit_outputs,
    "your-model": _your_model,
    "your-network": _your_network,
    "saved-predictions": _saved_predictions,
    "loss-table": _loss_table,
    "deployment": _deployment,
}


@pytest.fixture(scope="module")
def main_job_folder(classification_demo, tmp_path_factory):
    """A folder as the main job leaves it: ``exitguard-report/classification/`` inside."""
    root, _, _ = classification_demo
    folder = tmp_path_factory.mktemp("readme")
    shutil.copytree(root / "report", folder / REPORT)
    return folder


# ------------------------------------------------------------------------------- tests


PYTHON = blocks("python")


@pytest.mark.parametrize(("line", "marker", "body"), PYTHON, ids=[f"line {b[0]}" for b in PYTHON])
def test_python_example_runs(line, marker, body, main_job_folder, monkeypatch):
    if marker.startswith("skip"):
        pytest.skip(f"README line {line}: {marker}")
    monkeypatch.chdir(main_job_folder)
    setup = re.fullmatch(r"setup (\S+)", marker)
    assert setup or not marker, f"README line {line}: unknown marker {marker!r}"
    namespace = SETUPS[setup[1]]() if setup else {}
    exec(compile(body, f"README.md:{line}", "exec"), namespace)


BASH = blocks("bash")


@pytest.mark.parametrize(("line", "marker", "body"), BASH, ids=[f"line {b[0]}" for b in BASH])
def test_command_line_examples_parse_and_run(line, marker, body, main_job_folder, monkeypatch):
    parser = build_parser()
    for argv in commands(body):
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"README line {line}: `exitguard {' '.join(argv)}` does not parse")
    if marker == "run":
        monkeypatch.chdir(main_job_folder)
        for argv in commands(body):
            assert main(argv) == 0, f"README line {line}: exitguard {' '.join(argv)}"


def test_every_block_is_seen_and_the_command_examples_run():
    """The extraction finds the blocks (a broken pattern would pass every test above)."""
    assert len(PYTHON) >= 6 and len(BASH) >= 6
    ran = [body for _, marker, body in BASH if marker == "run"]
    assert ran and any("calibrate" in argv for body in ran for argv in commands(body))
    assert sum(len(commands(body)) for _, _, body in BASH) >= 15


def test_quick_is_described_as_the_help_describes_it():
    assert QUICK_HELP in " ".join(README.read_text().split())
