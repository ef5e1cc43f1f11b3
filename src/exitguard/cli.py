"""The `exitguard` command line: thin wrappers around the public API."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import warnings
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from exitguard import __version__
from exitguard.calibration import build_table, calibrate_table
from exitguard.evaluation import evaluate
from exitguard.policy import ExitPolicy
from exitguard.risk.confidence import CONFIDENCES
from exitguard.risk.losses import RISKS, get_risk
from exitguard.risk.procedures import ALIASES, PROCEDURES

CALM_TARGET_RISKS = tuple(round(0.01 * k, 2) for k in range(1, 20))


class CommandError(Exception):
    """A problem with the command's input, reported as one line on stderr (exit status 2)."""


def _load_npz(path: str) -> dict[str, np.ndarray]:
    source = Path(path)
    if not source.is_file():
        raise CommandError(f"FILE: no such file: {source}")
    try:
        with np.load(source, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (ValueError, OSError) as error:
        raise CommandError(f"FILE: {source} is not a readable .npz file ({error}).") from error


def load_tables(args: argparse.Namespace) -> dict[str, Any]:
    """Read FILE as a loss table (``losses``) or per-exit outputs (``probs``/``logits``)."""
    data = _load_npz(args.file)
    if "losses" in data:
        if args.risk is not None:
            raise CommandError("--risk applies to per-exit files (probs or logits), not tables.")
        bound = 1.0 if args.loss_bound is None else args.loss_bound
        return {
            "losses": data["losses"],
            "cost": data.get("cost"),
            "thresholds": data.get("thresholds"),
            "loss_bound": bound,
            "risk": None,
        }
    outputs_key = "probs" if "probs" in data else "logits" if "logits" in data else None
    if outputs_key is None:
        raise CommandError(
            f"FILE must hold `losses` (a loss table) or `probs`/`logits` (per-exit outputs); "
            f"{args.file} holds {sorted(data) or 'nothing'}."
        )
    risk = get_risk(args.risk or "prediction_gap", rng=args.seed)
    tables = build_table(
        data[outputs_key],
        data.get("labels"),
        risk=risk,
        confidence=args.confidence,
        from_logits=outputs_key == "logits",
        rng=args.seed,
    )
    bound = risk.loss_bound if args.loss_bound is None else args.loss_bound
    return {**tables, "loss_bound": bound, "risk": risk.name, "n_exits": data[outputs_key].shape[1]}


def _add_input_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="npz with `losses` (K, n) or per-exit `probs`/`logits`")
    parser.add_argument("--delta", type=float, default=0.1, help="1 - confidence level")
    parser.add_argument(
        "--loss-bound", type=float, default=None, help="B (default 1, or the risk's)"
    )
    parser.add_argument("--risk", choices=RISKS, default=None, help="risk for per-exit files")
    parser.add_argument(
        "--confidence",
        choices=tuple(CONFIDENCES),
        default="max_softmax",
        help="confidence measure for per-exit files",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for splits and sampled labels")
    parser.add_argument(
        "--bet-cap", type=float, default=None, help="cap on the WSR bets (default 1/B)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_calibrate(args: argparse.Namespace) -> int:
    tables = load_tables(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        policy = calibrate_table(
            tables["losses"],
            target_risk=args.target_risk,
            delta=args.delta,
            procedure=args.procedure,
            loss_bound=tables["loss_bound"],
            cost=tables["cost"],
            thresholds=tables["thresholds"],
            bet_cap=args.bet_cap,
            risk=tables["risk"],
            confidence=args.confidence if tables["risk"] else None,
        )
    if tables.get("n_exits") is not None:
        policy = policy.with_model(n_exits=int(tables["n_exits"]))
    if args.out:
        policy.save(args.out)
    if args.json:
        print(json.dumps({**policy.to_dict(), "warnings": [str(w.message) for w in caught]}))
        return 0
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    print(describe_policy(policy))
    if args.out:
        print(f"policy written to {args.out}")
    return 0


def describe_policy(policy: ExitPolicy) -> str:
    threshold = (
        "never exit early (the full model)"
        if policy.is_full_model
        else (f"{policy.threshold:g}" if policy.threshold is not None else f"row {policy.index}")
    )
    lines = [
        f"procedure       {policy.procedure}",
        f"threshold       {threshold}  (grid row {policy.index})",
        f"certified       {'yes' if policy.certified else 'no'}",
        f"guarantee       {policy.guarantee}",
        f"calibration     n = {policy.n}, empirical risk {policy.empirical_risk:.4f}",
    ]
    if policy.upper_bound is not None:
        lines.append(f"upper bound     {policy.upper_bound:.4f}")
    if policy.p_value is not None:
        lines.append(f"p-value         {policy.p_value:.4g}")
    if policy.expected_cost is not None:
        saving = policy.relative_saving
        extra = f"  ({100 * saving:.1f}% below the full model)" if saving is not None else ""
        lines.append(f"expected cost   {policy.expected_cost:.4g}{extra}")
    return "\n".join(lines)


def cmd_evaluate(args: argparse.Namespace) -> int:
    tables = load_tables(args)
    result = evaluate(
        tables["losses"],
        procedures=args.procedure,
        target_risks=args.target_risk,
        delta=args.delta,
        n_cal=args.n_cal,
        trials=args.trials,
        loss_bound=tables["loss_bound"],
        cost=tables["cost"],
        seed=args.seed,
        bet_cap=args.bet_cap,
    )
    if args.out:
        result.save(args.out)
    if args.json:
        data = result.to_dict()
        print(json.dumps({"results": data.pop("rows"), **data}))
    else:
        print(
            f"{result.trials} random splits: n_cal = {result.n_cal}, n_test = {result.n_test}, "
            f"delta = {result.delta:g}"
        )
        print(result.table())
    return 0


DEMO_TASKS = ("classification", "segmentation", "diffusion", "text", "calm")
DEFAULT_N_CAL = {
    "classification": 100,
    "segmentation": 400,
    "diffusion": 500,
    "text": 500,
    "calm": 100,
}


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: a vision task end to end, or the paper's CALM experiment."""
    if args.n_cal is None:
        args.n_cal = DEFAULT_N_CAL[args.task]
    if args.task == "calm":
        return demo_calm(args)
    try:
        module = importlib.import_module(f"exitguard.tasks.{args.task}")
    except ImportError as error:
        raise CommandError(
            f"the {args.task} demo needs PyTorch and the data extras ({error}); install "
            'them with: pip install torch==2.13.0 && pip install "exitguard[torch,plot,data]"'
        ) from error
    data = {"dataset": args.dataset, "dataset_path": args.data_path}
    if args.task == "text":  # one corpus: King James verses (scripts/install-text.sh)
        if args.dataset != "digits" or args.data_path:
            raise CommandError("--dataset and --data-path apply to the image tasks, not to text.")
        data = {}
    config = module.DemoConfig(
        **data,
        out=args.out or "exitguard-report",
        seed=args.seed,
        n_cal=args.n_cal,
        trials=args.trials,
        delta=args.delta,
        quick=args.quick,
        progress=not args.no_progress,
    )
    start = time.perf_counter()
    results = module.run_demo(config)
    print()
    for line in results["summary"]:
        print(f"- {line}")
    seconds = time.perf_counter() - start
    print(f"\nreport written to {Path(config.out) / 'index.html'} ({seconds:.0f} s)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from exitguard.report import rebuild_report

    try:
        page = rebuild_report(args.results, out=args.out)
    except FileNotFoundError as error:
        raise CommandError(str(error)) from error
    print(f"report written to {page}")
    return 0


def demo_calm(args: argparse.Namespace) -> int:
    """The CALM experiment of the paper on its released loss table (embedded)."""
    source = resources.files("exitguard") / "data" / "calm_cnndm.npz"
    with resources.as_file(source) as path, np.load(path, allow_pickle=False) as data:
        losses, cost = data["losses"], data["cost"]
    trials = 20 if args.quick else args.trials
    print(
        "CALM (early-exit T5 decoder) summarising CNN/DailyMail, 2000 articles x 100 thresholds;\n"
        "loss = ROUGE-L drop against the full model (signed, B = 1); cost = mean decoder layers.\n"
        f"{trials} random splits with n_cal = {args.n_cal}, delta = {args.delta:g}.\n"
    )
    result = evaluate(
        losses,
        procedures=("naive", "crc", "ucb-wsr", "ltt"),
        target_risks=(0.01, 0.02, 0.03, 0.05, 0.1, 0.15),
        delta=args.delta,
        n_cal=args.n_cal,
        trials=trials,
        cost=cost,
        seed=args.seed,
    )
    print(result.table(cost_label="layers"))
    print(
        "\nviol. = share of splits whose test risk exceeds eps; pop.viol = the same for the risk"
        " on all 2000 articles.\nnaive has no guarantee; crc bounds the mean risk; ucb-wsr and"
        f" ltt keep P(risk > eps) <= {args.delta:g}."
    )
    if args.out:
        result.save(args.out)
        print(f"results written to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exitguard",
        description="Early-exit networks, fast yet safe: exit thresholds with risk control.",
    )
    parser.add_argument("--version", action="version", version=f"exitguard {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    procedures = (*PROCEDURES, *ALIASES)

    calibrate = commands.add_parser("calibrate", help="pick a certified exit threshold")
    _add_input_options(calibrate)
    calibrate.add_argument("--target-risk", type=float, required=True, help="epsilon in (0, 1)")
    calibrate.add_argument("--procedure", choices=procedures, default="ucb-wsr")
    calibrate.add_argument("--out", help="write the policy as JSON to this file")
    calibrate.set_defaults(handler=cmd_calibrate)

    evaluate_ = commands.add_parser("evaluate", help="repeated calibration/test splits")
    _add_input_options(evaluate_)
    evaluate_.add_argument(
        "--procedure", nargs="+", choices=procedures, default=["naive", "crc", "ucb-wsr", "ltt"]
    )
    evaluate_.add_argument("--target-risk", nargs="+", type=float, default=[0.01, 0.02, 0.05, 0.1])
    evaluate_.add_argument("--n-cal", type=int, default=100)
    evaluate_.add_argument("--trials", type=int, default=100)
    evaluate_.add_argument("--out", help="write the results as JSON to this file")
    evaluate_.set_defaults(handler=cmd_evaluate)

    demo = commands.add_parser("demo", help="run the main experiment on embedded real data")
    demo.add_argument(
        "--task",
        choices=DEMO_TASKS,
        default="classification",
        help="classification, segmentation, diffusion: train (or load) a multi-exit network on "
        "real images, calibrate, time it and write a report; text: the same for MiniLM on King "
        "James verses (scripts/install-text.sh); calm: the paper's "
        "language-modelling experiment on its released loss table",
    )
    demo.add_argument(
        "--dataset", choices=("digits", "mnist-5k", "fashion-mnist"), default="digits"
    )
    demo.add_argument(
        "--data-path", help="folder of the Fashion-MNIST IDX files (for --dataset fashion-mnist)"
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument(
        "--n-cal",
        type=int,
        default=None,
        help="calibration size (default: 100; 400 for segmentation and 500 for diffusion, "
        "as in the paper)",
    )
    demo.add_argument("--trials", type=int, default=100)
    demo.add_argument("--delta", type=float, default=0.1)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="fewer splits, for a smoke run")
    demo.add_argument(
        "--out", help="report folder (classification; default exitguard-report) or JSON file (calm)"
    )
    demo.set_defaults(handler=cmd_demo)

    report = commands.add_parser("report", help="rebuild a report folder from its results.json")
    report.add_argument("results", help="results.json written by `exitguard demo`")
    report.add_argument("--out", help="folder to write to (default: beside results.json)")
    report.set_defaults(handler=cmd_report)

    from exitguard.tasks.language.cli import add_lm_parser  # imports no torch until it runs

    add_lm_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except (CommandError, ValueError, FileNotFoundError, ModuleNotFoundError) as error:
        print(f"exitguard {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
